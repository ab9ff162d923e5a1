"""Asteroid model packages: load a float teacher or a quantized model, save a quantized one.

A quantized package is Asteroid's own (``model.serialize()``: ``model_name``, ``model_args``,
``state_dict``) plus an ``fqss`` entry holding the quantization config.
"""
from __future__ import annotations

from pathlib import Path

import torch
from asteroid import models as asteroid_models
from asteroid.models.base_models import BaseModel
from asteroid.utils.hub_utils import cached_download
from torch import nn
from torch.torch_version import TorchVersion

from ..atomic import atomic_save
from ..quant import QuantConfig, freeze
from .wrappers import prepare_model

PACKAGE_FILES = ("best_model.pth", "model.pth", "pytorch_model.bin")


def _load_package(path: Path) -> dict:
    """``torch.load`` an Asteroid model package (it pickles ``torch.__version__`` as a TorchVersion)."""
    try:
        with torch.serialization.safe_globals([TorchVersion]):
            package = torch.load(path, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable Asteroid model package ({type(error).__name__}: {error})") from None
    if not isinstance(package, dict) or not {"model_name", "model_args", "state_dict"} <= set(package):
        raise ValueError(f"{path}: not an Asteroid model package (expected keys model_name, model_args, state_dict)")
    return package


def resolve_package(source: str | Path) -> dict:
    """The model package at ``source``: a package file, a directory holding one, or a Hugging Face hub id.

    Hub ids (e.g. ``JorisCos/ConvTasNet_Libri2Mix_sepclean_8k``) go through Asteroid's own
    download code (``asteroid.utils.hub_utils.cached_download``), which honours ``HF_HUB_OFFLINE``
    and ``ASTEROID_CACHE``.
    """
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in PACKAGE_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no model package in this directory (looked for {', '.join(PACKAGE_FILES)})")
        path = found[0]
    elif not path.exists():
        if Path(source).suffix in (".pth", ".bin", ".ckpt") or str(source).startswith((".", "/")):
            raise FileNotFoundError(f"{source}: no such model file")
        try:
            path = Path(cached_download(str(source)))
        except Exception as error:  # noqa: BLE001 - hub/network errors get one clear message
            raise FileNotFoundError(f"{source}: not a local file or directory, and not available from the Hugging Face "
                                    f"hub ({type(error).__name__}: {error})") from None
    return _load_package(path)


def load_float_model(source: str | Path) -> nn.Module:
    """A float Asteroid model from a package file, a directory or a hub id (the FQSS teacher)."""
    package = resolve_package(source)
    if "fqss" in package:
        raise ValueError(f"{source}: this is a quantized fqss model; a float teacher is needed here")
    return BaseModel.from_pretrained(package)


def load_quantized_model(source: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized_model`: float architecture, ``prepare``, strict load."""
    package = resolve_package(source)
    if "fqss" not in package:
        raise ValueError(f"{source}: not a quantized fqss model (no 'fqss' entry); use load_float_model for float ones")
    model = asteroid_models.get(package["model_name"])(**package["model_args"])
    prepare_model(model, QuantConfig(**package["fqss"]["config"]))
    try:
        model.load_state_dict(package["state_dict"], strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source}: its weights do not fit a quantized {package['model_name']} "
                         f"({str(error).splitlines()[0]})") from None
    if package["fqss"].get("frozen"):
        freeze(model)
    return model


def save_quantized_model(model: nn.Module, path: str | Path, config: QuantConfig, infos: dict | None = None) -> Path:
    """Write an Asteroid package (``serialize()``) plus the quantization config, atomically."""
    package = model.serialize()
    package["infos"] = {k: (str(v) if k == "software_versions" else v) for k, v in package.get("infos", {}).items()}
    package["infos"].update(infos or {})
    package["fqss"] = {"config": config.to_dict()}
    return atomic_save(package, path)
