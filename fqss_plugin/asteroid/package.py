"""Asteroid model packages: load a float teacher or a quantized model, save a quantized one.

A quantized Asteroid model is an instance of a quantized model class registered with Asteroid
(``FQSSConvTasNet``, ``FQSSDPTNet``, ``FQSSStereoConvTasNet``, ...: :func:`quantized_class`), a subclass of the float class whose
constructor also takes ``fqss_config`` and quantizes itself. So its package is Asteroid's own
(``model.serialize()``: ``model_name``, ``model_args`` with ``fqss_config``, ``state_dict`` with the
quantizer state), and Asteroid's own loader, ``ConvTasNet.from_pretrained("best_model.pth")``, rebuilds
it once ``fqss_plugin.asteroid`` is imported.
"""
from __future__ import annotations

from pathlib import Path

import torch
from asteroid import models as asteroid_models
from asteroid.models.base_models import BaseModel
from asteroid.utils.hub_utils import cached_download
from torch import nn
from torch.torch_version import TorchVersion

import copy
import dataclasses

from ..atomic import atomic_save
from ..quant import QuantConfig, prepare
from ..quant.signal_io import SplitActivationQuantizer
from ..recipe_errors import first_line
from . import wrappers  # noqa: F401  (registers the wrappers that prepare uses)
from .stereo import StereoConvTasNet


class QuantizedAsteroidModel:
    """Mixin of the quantized model classes: ``__init__(..., fqss_config=None)`` builds the float model and
    quantizes it (:func:`~fqss_plugin.asteroid.prepare_model`; the FQSS preset by default); ``get_model_args``
    adds ``fqss_config``, so that ``serialize()`` and ``from_pretrained`` round-trip."""

    fqss_config: QuantConfig

    def __init__(self, *args, fqss_config: dict | QuantConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        prepare_model(self, _as_config(fqss_config))

    def get_model_args(self) -> dict:
        return {**super().get_model_args(), "fqss_config": self.fqss_config.to_dict()}

    def serialize(self) -> dict:
        return with_plain_versions(super().serialize())


def with_plain_versions(package: dict) -> dict:
    """An Asteroid package (``model.serialize()``) with its software versions as plain strings, in place:
    ``torch.load``'s weights-only unpickler refuses the ``TorchVersion`` that Asteroid stores."""
    infos = package.setdefault("infos", {})
    infos["software_versions"] = {k: str(v) for k, v in infos.get("software_versions", {}).items()}
    return package


def _as_config(config: dict | QuantConfig | None) -> QuantConfig:
    if config is None:
        return QuantConfig.fqss()
    return config if isinstance(config, QuantConfig) else QuantConfig(**config)


_QUANTIZED_CLASSES: dict[type, type] = {}


def quantized_class(float_class: type) -> type:
    """``FQSS<Name>``, the quantized class of an Asteroid model class, registered with
    ``asteroid.models.register_model`` (created on the first call)."""
    if issubclass(float_class, QuantizedAsteroidModel):
        return float_class
    if float_class not in _QUANTIZED_CLASSES:
        name = f"FQSS{float_class.__name__}"
        quantized = type(name, (QuantizedAsteroidModel, float_class),
                         {"__module__": __name__, "__qualname__": name,
                          "__doc__": f"Asteroid's {float_class.__name__}, fully quantized (fqss)."})
        globals()[name] = quantized                     # importable, hence picklable
        try:
            asteroid_models.register_model(quantized)
        except ValueError:                              # registered by an earlier import of this module
            pass
        _QUANTIZED_CLASSES[float_class] = quantized
    return _QUANTIZED_CLASSES[float_class]


for _float_class in (asteroid_models.ConvTasNet, asteroid_models.DPTNet, StereoConvTasNet):
    quantized_class(_float_class)


def prepare_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """:func:`fqss_plugin.prepare` for an Asteroid ``BaseEncoderMaskerDecoder`` (``encoder``/``decoder``), in
    place; an Asteroid model also becomes an instance of its registered quantized class
    (:func:`quantized_class`), which serializes with its config. Returns ``model``.

    A model whose input is not a waveform in [-1, 1] (it has an ``input_normalization``: music normalised by
    its mean and std) gets, with ``in_splits > 1``, its input on ``in_splits`` 8-bit tensors of a learned range
    (:class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer`, the method's splitter without
    normalisation, as the Demucs adapter's branch inputs) instead of the peak-normalised
    :class:`~fqss_plugin.quant.signal_io.InputSplitter`, whose grid ends at 1.
    """
    config = config or QuantConfig.fqss()
    if getattr(model, "input_normalization", None) is not None and config.in_splits > 1:
        prepare(model, dataclasses.replace(config, in_splits=1, normalize_input=False), encoder="encoder",
                decoder="decoder")
        model.encoder.input_quantizer = SplitActivationQuantizer(model.encoder.input_quantizer, config.act_bits,
                                                                 config.in_splits)
    else:
        prepare(model, config, encoder="encoder", decoder="decoder")
    if isinstance(model, BaseModel):
        model.__class__ = quantized_class(type(model))
        model.fqss_config = config
    return model


def prepare_qat(model: nn.Module, pretrained: str | Path, config: QuantConfig | None = None
                ) -> tuple[nn.Module, nn.Module]:
    """The FQSS start of an Asteroid recipe: ``model`` (as the recipe builds it) takes the float weights of
    ``pretrained`` (a package file, a directory or a hub id), a float copy becomes the teacher, and ``model``
    is quantized in place (:func:`prepare_model`). Returns ``(model, teacher)``::

        model = ConvTasNet(**conf["filterbank"], **conf["masknet"], sample_rate=...)
        model, teacher = prepare_qat(model, conf["main_args"]["pretrained"])
        ...
        system = FQSSSystem(model=model, ..., teacher=teacher)
    """
    package = resolve_package(pretrained)
    if is_quantized_package(package):
        raise ValueError(f"{pretrained}: this is a quantized fqss model; a float teacher is needed here")
    try:
        model.load_state_dict(package["state_dict"], strict=True)
    except RuntimeError as error:
        raise ValueError(f"{pretrained}: its weights do not fit the {type(model).__name__} of this conf "
                         f"({str(error).strip().splitlines()[0]}); the conf must describe the pretrained "
                         f"architecture {package['model_args']}") from None
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    return prepare_model(model, config), teacher

PACKAGE_FILES = ("best_model.pth", "model.pth", "pytorch_model.bin")


def _load_package(path: Path) -> dict:
    """``torch.load`` an Asteroid model package (it pickles ``torch.__version__`` as a TorchVersion)."""
    try:
        with torch.serialization.safe_globals([TorchVersion]):
            package = torch.load(path, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable Asteroid model package ({first_line(error)})") from None
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


def is_quantized_package(package: dict) -> bool:
    return "fqss_config" in package.get("model_args", {})


def load_float_model(source: str | Path) -> nn.Module:
    """A float Asteroid model from a package file, a directory or a hub id (the FQSS teacher)."""
    package = resolve_package(source)
    if is_quantized_package(package):
        raise ValueError(f"{source}: this is a quantized fqss model; a float teacher is needed here")
    return BaseModel.from_pretrained(package)


def load_quantized_model(source: str | Path) -> nn.Module:
    """A quantized model from its package (file, directory or hub id), through Asteroid's own
    ``BaseModel.from_pretrained`` and the registered quantized class."""
    package = resolve_package(source)
    if not is_quantized_package(package):
        raise ValueError(f"{source}: not a quantized fqss model (no fqss_config in its model_args); use "
                         "load_float_model for float ones")
    try:
        return BaseModel.from_pretrained(package)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: its weights do not fit a quantized {package['model_name']} "
                         f"({str(error).strip().splitlines()[0]})") from None


def save_quantized_model(model: nn.Module, path: str | Path, config: QuantConfig | None = None,
                         infos: dict | None = None) -> Path:
    """Write the Asteroid package of a quantized model (``serialize()``, the config in its ``model_args``)
    plus ``infos``, atomically. ``config``, if given, must be the one the model was prepared with."""
    if not isinstance(model, QuantizedAsteroidModel):
        raise ValueError(f"save_quantized_model: {type(model).__name__} is not quantized (use prepare_model)")
    if config is not None and config != model.fqss_config:
        raise ValueError(f"save_quantized_model: the model was prepared with {model.fqss_config}, not {config}")
    package = model.serialize()
    package["infos"].update(infos or {})
    return atomic_save(package, path)
