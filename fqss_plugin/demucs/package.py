"""Quantizing and packaging a Demucs model.

* :func:`prepare_model` quantizes an ``HTDemucs`` in place (two branches: two inputs, two outputs) and
  makes it an :class:`FQSSHTDemucs`;
* :class:`FQSSHTDemucs` builds itself quantized from the constructor arguments plus ``fqss_config``, so
  :func:`save_quantized_model` writes Demucs' own package format (``klass``, ``args``, ``kwargs``,
  ``state``) and Demucs' own loaders, ``demucs.states.load_model`` and
  ``demucs.pretrained.get_model(sig, repo=<dir>)``, rebuild the quantized model;
* :func:`save_hub_folder` writes the layout of Demucs' Hugging Face repositories (``<name>.yaml`` naming the
  models of the bag, one ``<sig>.safetensors`` per model with the class and arguments in its metadata), which
  ``demucs.pretrained.get_model("hf://<namespace>/<name>")`` loads once the folder is uploaded as
  ``<namespace>/<demucs.hf.hf_repo_name(name)>``;
* :func:`load_pretrained_htdemucs`: one ``HTDemucs`` from a package file or from Demucs' ``get_model`` (a model
  name, ``hf://`` included).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from fractions import Fraction
from pathlib import Path

import yaml
from demucs.htdemucs import HTDemucs
from demucs.states import get_state, load_model
from torch import nn

from ..atomic import atomic_save
from ..quant import QuantConfig, prepare
from ..quant.prepare import split_activations
from ..quant.quantizers import activation_quantizer
from ..quant.signal_io import OutputCombiner, SplitActivationQuantizer
from .wrappers import QHTDemucs


def branch_layers(model: HTDemucs) -> tuple[list[str], list[str]]:
    """The first weighted layers of both branches (``encoder.0.conv``, ``tencoder.0.conv``) and their last ones
    (``decoder.<last>.conv_tr``, ``tdecoder.<last>.conv_tr``)."""
    return (["encoder.0.conv", "tencoder.0.conv"],
            [f"decoder.{len(model.decoder) - 1}.conv_tr", f"tdecoder.{len(model.tdecoder) - 1}.conv_tr"])


def prepare_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Quantize an ``HTDemucs`` in place and return it (FQSS preset by default).

    Every layer goes through the registered wrappers. Each branch's input (the mean/std-normalised
    magnitude spectrogram, the normalised waveform) is quantized where the branch's first conv reads it:
    with ``in_splits > 1`` it is carried by that many 8-bit tensors
    (:class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer`: a learned range, no normalisation,
    the conv run once per tensor), else by one learned 8-bit quantizer. Each branch's last transposed
    conv emits ``out_splits`` 8-bit outputs (:class:`~fqss_plugin.quant.signal_io.OutputCombiner`).
    ``normalize_input``, ``decoder_in_splits`` and ``encoder_out_splits`` do not apply: HTDemucs
    normalises its inputs itself, and applies its mask in float after the decoders. ``layer_act_splits``
    does, e.g. ``{"encoder": 2, "decoder": 2}`` (the FQSS conf of ``recipes/MUSDB18/HTDemucs``):
    the frequency branch's activations spread over a range that one 8-bit grid either clips or rounds
    coarsely, and two 8-bit tensors on an unclipped range carry them.
    """
    config = config or QuantConfig.fqss()
    if not isinstance(model, HTDemucs):
        raise TypeError(f"fqss_plugin.demucs.prepare_model: expected a demucs HTDemucs, got {type(model).__name__}")
    prepare(model, dataclasses.replace(config, normalize_input=False, layer_act_splits={}))
    for idx, layer in enumerate(model.encoder):       # the time branch joins where its encoder layer is empty
        if not (idx < len(model.tencoder) and model.tencoder[idx].empty):
            layer.inject_add = None
    firsts, lasts = branch_layers(model)
    for name in firsts:
        quantizer = activation_quantizer(config)
        if config.in_splits > 1:
            quantizer = SplitActivationQuantizer(quantizer, config.act_bits, config.in_splits)
        model.get_submodule(name).input_quantizer = quantizer
    if config.out_splits > 1:
        for name in lasts:
            model.get_submodule(name).output_combiner = OutputCombiner(config.act_bits, config.out_splits, None)
    split_activations(model, config)                  # after the combiners, whose layers keep their outputs
    model.__class__ = FQSSHTDemucs
    model.fqss_config = config
    return model


class FQSSHTDemucs(QHTDemucs):
    """A quantized HTDemucs that builds itself: ``FQSSHTDemucs(*args, fqss_config=..., **kwargs)`` is
    ``prepare_model(HTDemucs(*args, **kwargs), QuantConfig(**fqss_config))`` (the FQSS preset by default)."""

    fqss_config: QuantConfig

    def __init__(self, *args, fqss_config: dict | QuantConfig | None = None, **kwargs) -> None:
        HTDemucs.__init__(self, *args, **kwargs)
        self.__class__ = HTDemucs                     # prepare_model converts it as any HTDemucs
        config = fqss_config if isinstance(fqss_config, QuantConfig) else \
            QuantConfig(**fqss_config) if fqss_config else None
        prepare_model(self, config)


def _with_config_parameter(cls: type) -> inspect.Signature:
    """``HTDemucs``'s signature plus ``fqss_config``: Demucs' loader drops every keyword argument that the
    class's signature does not name."""
    parameters = list(inspect.signature(cls).parameters.values())
    return inspect.Signature(parameters + [inspect.Parameter("fqss_config", inspect.Parameter.KEYWORD_ONLY,
                                                             default=None)])


FQSSHTDemucs.__signature__ = _with_config_parameter(HTDemucs)


def save_quantized_model(model: FQSSHTDemucs, path: str | Path) -> Path:
    """Demucs' package of a quantized model (``klass``, ``args``, ``kwargs`` with ``fqss_config``, ``state``),
    written atomically; name it ``<signature>.th`` in a folder for ``get_model(signature, repo=folder)``."""
    if not isinstance(model, FQSSHTDemucs):
        raise ValueError(f"save_quantized_model: {type(model).__name__} is not a quantized HTDemucs (use prepare_model)")
    args, kwargs = model._init_args_kwargs
    package = {"klass": FQSSHTDemucs, "args": args, "kwargs": {**kwargs, "fqss_config": model.fqss_config.to_dict()},
               "state": get_state(model, None, half=False)}
    return atomic_save(package, path)


def _json_ready(value):
    """Demucs' JSON encoding of constructor arguments (``demucs.hf._decode_json`` reads it back): fractions as
    ``{"_type": "fraction", ...}``, tuples as lists."""
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def save_hub_folder(model: HTDemucs, folder: str | Path, name: str, signature: str | None = None) -> Path:
    """Write ``model`` (float or quantized) in the layout of Demucs' Hugging Face repositories: ``<name>.yaml``
    (a bag of this one model) and ``<signature>.safetensors`` (the state, with ``klass``, ``args`` and ``kwargs``
    as JSON metadata, ``fqss_config`` among the kwargs of a quantized model). Upload ``folder`` as the hub
    repository ``<namespace>/<demucs.hf.hf_repo_name(name)>`` and ``get_model("hf://<namespace>/<name>")`` loads
    it. Returns the yaml's path."""
    from safetensors.torch import save_file

    if not isinstance(model, HTDemucs):
        raise ValueError(f"save_hub_folder: expected an HTDemucs, got {type(model).__name__}")
    signature = signature or name
    args, kwargs = model._init_args_kwargs
    if isinstance(model, FQSSHTDemucs):
        kwargs = {**kwargs, "fqss_config": model.fqss_config.to_dict()}
    klass = FQSSHTDemucs if isinstance(model, FQSSHTDemucs) else type(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in get_state(model, None).items()}
    metadata = {"klass": f"{klass.__module__}.{klass.__qualname__}", "args": json.dumps(_json_ready(list(args))),
                "kwargs": json.dumps(_json_ready(kwargs))}
    save_file(state, str(folder / f"{signature}.safetensors"), metadata=metadata)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"models": [signature]}))
    return folder / f"{name}.yaml"


def load_pretrained_htdemucs(source: str | Path) -> HTDemucs:
    """One ``HTDemucs`` (float or quantized) from a Demucs package file (``<sig>.th``), else through
    ``demucs.pretrained.get_model(source)``: a model name (``htdemucs``: the Hugging Face hub, then Demucs'
    legacy repository) or ``hf://<namespace>/<name>``. A bag of several models is refused (QAT trains one)."""
    if Path(source).is_file():
        return load_model(str(source))
    from demucs.apply import BagOfModels
    from demucs.pretrained import get_model

    model = get_model(str(source))
    if isinstance(model, BagOfModels):
        if len(model.models) != 1:
            raise ValueError(f"{source}: a bag of {len(model.models)} models; QAT takes one HTDemucs (pass one of "
                             "the bag's models as a package file)")
        model = model.models[0]
    if not isinstance(model, HTDemucs):
        raise ValueError(f"{source}: a {type(model).__name__}, not an HTDemucs")
    return model
