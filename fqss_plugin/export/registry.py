"""What the export package knows of the toolkits: what their adapters register here.

The export package never imports a toolkit adapter; each adapter, when imported, registers

* its **export rewrites** (:func:`register_rewrite`): functions ``rewrite(view, options)`` that swap,
  on the frozen export copy, the classes of the toolkit's modules for variants that compute the same
  values with ops the ONNX exporter writes plainly; :func:`~fqss_plugin.export.view.export_view`
  runs every registered rewrite after the generic ones;
* its **package loader** (:func:`register_package_loader`): how ``fqss export --checkpoint`` recognises
  and loads a trained model package of that toolkit.

The adapters are found through the ``fqss_plugin.adapters`` entry points (``setup.cfg``); an
adapter whose toolkit is not installed is skipped. A new toolkit's adapter adds one entry point and
registers its rewrites and loader on import.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from torch import nn

ADAPTER_GROUP = "fqss_plugin.adapters"


@dataclass(frozen=True)
class ExportOptions:
    """The options of :func:`~fqss_plugin.export.to_onnx` that rewrites read.

    Attributes:
        decoder: ``"conv"`` or ``"matmul"``: how a filterbank decoder (a transposed conv) is written.
        staged_norm_means: take each mean of a global layer norm one axis at a time.
    """

    decoder: str = "conv"
    staged_norm_means: bool = False


Rewrite = Callable[[nn.Module, ExportOptions], None]


@dataclass(frozen=True)
class PackageLoader:
    """How to recognise and load one toolkit's trained model package.

    Attributes:
        toolkit: the toolkit's name, for messages.
        matches: ``matches(path)``: whether ``path`` (a file, a directory or a hub id) is such a package.
        load: ``load(path)``: the quantized ``nn.Module``; ``ValueError``/``FileNotFoundError`` for a
            float or malformed package.
        executes_code: loading runs code from the package (e.g. a hyperpyyaml file): the command
            line asks for ``--trust-package``.
        describe: what a package of this toolkit is, for help and error messages.
        load_float: ``load_float(path)``: a float model from such a package (None: not offered).
    """

    toolkit: str
    matches: Callable[[str], bool]
    load: Callable[[str], nn.Module]
    executes_code: bool = False
    describe: str = ""
    load_float: Callable[[str], nn.Module] | None = None


_REWRITES: list[Rewrite] = []
_LOADERS: list[PackageLoader] = []
_EXPORTERS: dict[type, Callable] = {}
_RUNTIMES: dict[str, Callable] = {}


def register_rewrite(rewrite: Rewrite) -> Rewrite:
    """Add ``rewrite`` to the export rewrites (once; usable as a decorator)."""
    if rewrite not in _REWRITES:
        _REWRITES.append(rewrite)
    return rewrite


def rewrites() -> list[Rewrite]:
    return list(_REWRITES)


def register_exporter(model_type: type, export: Callable) -> None:
    """Let :func:`~fqss_plugin.export.to_onnx` hand models of ``model_type`` (and its subclasses) to ``export(model,
    path, target=..., integer_softmax=..., deploy=..., metadata=...)``: for a model whose graph is not
    ``mixture -> sources`` (e.g. HTDemucs, whose STFT and iSTFT stay outside it)."""
    _EXPORTERS[model_type] = export


def exporter_for(model: nn.Module) -> Callable | None:
    return next((export for kind, export in _EXPORTERS.items() if isinstance(model, kind)), None)


def register_runtime(architecture: str, open_model: Callable) -> None:
    """``open_model(path, threads, chunk_seconds)`` runs the files whose metadata names ``architecture`` (an
    object with :class:`~fqss_plugin.export.OrtSeparator`'s interface: ``separate``, ``sample_rate``, ``n_src``,
    ``sources``, ``audio_channels``)."""
    _RUNTIMES[architecture] = open_model


def runtime_for(architecture: str) -> Callable:
    load_adapters()
    if architecture not in _RUNTIMES:
        raise ValueError(f"no installed adapter runs {architecture!r} models (known: {', '.join(_RUNTIMES) or 'none'})")
    return _RUNTIMES[architecture]


def register_package_loader(loader: PackageLoader) -> None:
    """Add ``loader`` (a toolkit registers one; registering it again replaces it)."""
    _LOADERS[:] = [known for known in _LOADERS if known.toolkit != loader.toolkit] + [loader]


def load_adapters() -> list[str]:
    """Import every installed adapter (entry points of :data:`ADAPTER_GROUP`); return the toolkits loaded.

    An adapter whose toolkit is missing (``ImportError``) is skipped."""
    loaded = []
    for entry in entry_points(group=ADAPTER_GROUP):
        try:
            importlib.import_module(entry.value)
        except ImportError:
            continue
        loaded.append(entry.name)
    return loaded


def load_quantized_package(source: str | Path, trust_package: bool) -> nn.Module:
    """The quantized model of ``source`` through its toolkit's loader; a package whose loading runs code from it
    (:attr:`PackageLoader.executes_code`) only with ``trust_package`` (else ``ValueError`` naming the flag)."""
    loader = package_loader_for(source)
    if loader.executes_code and not trust_package:
        raise ValueError(f"{source}: loading a {loader.toolkit} package executes code from it ({loader.describe}); "
                         "pass --trust-package if you trust it")
    return loader.load(str(source))


def package_loader_for(source: str | Path) -> PackageLoader:
    """The loader of the first installed adapter whose ``matches`` accepts ``source``."""
    load_adapters()
    for loader in _LOADERS:
        if loader.matches(str(source)):
            return loader
    known = "; ".join(f"{loader.toolkit}: {loader.describe}" for loader in _LOADERS) or "no toolkit adapter installed"
    raise FileNotFoundError(f"{source}: not a model package of any installed toolkit ({known})")
