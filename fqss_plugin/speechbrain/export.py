"""SpeechBrain's part of ``fqss export``: the loader of SepFormer package directories, registered on import.

A SepFormer exports as a :class:`~fqss_plugin.speechbrain.package.SepformerWaveform` of plain torch
and core modules, so it needs no export rewrite. Loading a package runs its ``hyperparams.yaml``
(hyperpyyaml's ``!new``/``!apply`` tags execute Python): the loader says so, and ``fqss export``
then asks for ``--trust-package``.
"""
from __future__ import annotations

from pathlib import Path

from ..export.registry import PackageLoader, register_package_loader
from .package import load_quantized_separator


def _is_package(source: str) -> bool:
    return (Path(source) / "hyperparams.yaml").is_file()


register_package_loader(PackageLoader(
    toolkit="speechbrain", matches=_is_package, load=load_quantized_separator, executes_code=True,
    describe="a SepFormer package directory (hyperparams.yaml + encoder/masknet/decoder.ckpt) written by "
             "fqss_plugin.speechbrain.save_pretrained_separator; its hyperparams.yaml runs Python"))
