"""Where the quantization damage of a model comes from: run groups of its quantizers as identities.

A quantizer :func:`bypassed` computes nothing (``Q(x) = x``) while its state is left untouched, so
``score(model with group g bypassed) - score(model)`` is the quality that group's 8-bit rounding
costs (a one-at-a-time sensitivity analysis; the groups' costs need not add up, since roundings
interact). :func:`quantizer_groups` names the groups by role, for any model :func:`~fqss_plugin.prepare`
made: the outputs of every wrapper class (``QGlobLN outputs``; depthwise convolutions apart from the
others), and the weights of every weighted-layer class. :func:`quantizer_places` groups the same quantizers
by where they sit instead (the model's submodule holding them: a branch, an encoder).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn

from .quantizers import WeightQuantizer
from .signal_io import InputSplitter, SplitActivationQuantizer
from .state import LEARNED_QUANTIZERS


@contextmanager
def bypassed(quantizers: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, every given quantizer returns its input unchanged."""
    quantizers = list(quantizers)
    for quantizer in quantizers:
        if not isinstance(quantizer, LEARNED_QUANTIZERS):
            raise TypeError(f"bypassed: expected ActivationQuantizer or WeightQuantizer modules, got "
                            f"{type(quantizer).__name__}")
        quantizer.forward = _identity
    try:
        yield
    finally:
        for quantizer in quantizers:
            del quantizer.forward


def _identity(x):
    return x


def quantizer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Quantizer module names of ``model`` grouped by role, in the order they appear.

    An activation quantizer belongs to ``"<wrapper class> <attribute>s"`` (e.g. ``QGlobLN outputs``,
    ``QFilterbankDecoder inputs``), with depthwise convolutions (``groups == in_channels > 1``) as
    their own class; a weight quantizer to ``"<wrapper class> weights"``, the input splitter's
    extra kernels included with their layer's.
    """
    modules = dict(model.named_modules())
    groups: dict[str, list[str]] = defaultdict(list)
    for name, module in modules.items():
        if not isinstance(module, LEARNED_QUANTIZERS):
            continue
        owner_name, _, attribute = name.rpartition(".")
        owner = modules.get(owner_name)
        # climb out of the quantizer containers: the splitter's weight_quantizers.<i>, a split quantizer's first
        while isinstance(owner, (nn.ModuleList, InputSplitter, SplitActivationQuantizer)):
            if isinstance(owner, SplitActivationQuantizer):
                attribute = owner_name.rpartition(".")[2]
            owner_name = owner_name.rpartition(".")[0]
            owner = modules.get(owner_name)
        role = "weights" if isinstance(module, WeightQuantizer) else attribute.replace("_quantizer", "") + "s"
        groups[f"{_describe(owner)} {role}"].append(name)
    return dict(groups)


def quantizer_places(model: nn.Module, depth: int = 1) -> dict[str, list[str]]:
    """Quantizer module names of ``model`` grouped by the first ``depth`` components of their name (the
    submodule holding them, e.g. ``encoder`` or, with ``depth=2``, ``encoder.0``), in the order they appear."""
    if depth < 1:
        raise ValueError(f"quantizer_places: depth must be at least 1, got {depth}")
    places: dict[str, list[str]] = defaultdict(list)
    for name in (n for n, m in model.named_modules() if isinstance(m, LEARNED_QUANTIZERS)):
        places[".".join(name.split(".")[:depth])].append(name)
    return dict(places)


def _describe(module: nn.Module | None) -> str:
    if module is None:
        return "model"
    kind = type(module).__name__
    groups, channels = getattr(module, "groups", 1), getattr(module, "in_channels", None)
    if isinstance(groups, int) and groups > 1 and groups == channels:
        kind += " (depthwise)"
    return kind


def modules_named(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The submodules of ``model`` with these names (a clear error for a name it does not have)."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise KeyError(f"{type(model).__name__} has no module named {', '.join(missing[:3])}")
    return [modules[name] for name in names]
