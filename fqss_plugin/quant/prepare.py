"""``prepare`` a float model for quantization-aware training, and ``freeze`` it for export."""
from __future__ import annotations

from torch import nn

from .config import QuantConfig, inside, owner
from .layers import QuantizedLayer, QuantizedModule
from .quantizers import (ActivationQuantizer, FrozenActivationQuantizer, FrozenWeightQuantizer, WeightQuantizer,
                         activation_quantizer)
from .registry import wrapper_for
from .signal_io import InputSplitter, OutputCombiner, SignalScale, SplitActivationQuantizer


def prepare(model: nn.Module, config: QuantConfig | None = None, encoder: str | None = None,
            decoder: str | None = None) -> nn.Module:
    """Quantize ``model`` in place for QAT and return it.

    Every module whose type has a registered wrapper is converted in place (same object, same
    parameter names). ``encoder`` and ``decoder`` name (as in ``named_modules``) the first and
    last weighted layers: the encoder gets the :class:`InputSplitter` (or, with ``in_splits=1``,
    a learned input quantizer) and, with ``encoder_out_splits > 1``, a :class:`SplitActivationQuantizer`
    for its output; the decoder the :class:`OutputCombiner` and, if it quantizes its own input and
    ``decoder_in_splits > 1``, a :class:`SplitActivationQuantizer` for that input.

    Load pretrained float weights before the first forward pass: weight steps, split kernels
    and activation ranges initialise themselves from the weights and data they first see.
    """
    config = config or QuantConfig.fqss()
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare: model must be a torch.nn.Module, got {type(model).__name__}")
    excluded = config.exclude
    # names checked before anything is wrapped, so a bad name leaves the model as it was
    _check_names(model, config.layer_weight_bits, "layer_weight_bits")
    _check_names(model, config.layer_act_splits, "layer_act_splits")
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedModule) or owner(excluded, name) is not None:
            continue
        wrapper = wrapper_for(module)
        if wrapper is not None:
            wrapper.convert_(module, config.for_module(name))

    normalize = config.normalize_input and config.in_splits > 1
    signal_scale = SignalScale() if normalize else None
    if normalize and (encoder is None or decoder is None):
        raise ValueError("prepare: normalize_input with in_splits > 1 needs both encoder= and decoder= "
                         "(the decoder multiplies the output back by the input's peak)")
    if encoder is not None:
        layer = _weighted_layer(model, encoder, "encoder")
        if layer.input_splitter is not None or layer.input_quantizer is not None:
            raise ValueError(f"prepare: encoder={encoder!r} already has an input splitter/quantizer (prepared twice?)")
        if config.in_splits > 1:
            layer.input_splitter = InputSplitter(layer.weight, layer.weight_axis, config.for_module(encoder),
                                                 signal_scale)
        else:
            layer.input_quantizer = activation_quantizer(config)
        if config.encoder_out_splits > 1:
            if encoder == decoder:
                raise ValueError("prepare: encoder_out_splits > 1 needs an encoder other than the decoder")
            layer.output_quantizer = SplitActivationQuantizer(layer.output_quantizer, config.act_bits,
                                                              config.encoder_out_splits)
    if decoder is not None:
        layer = _weighted_layer(model, decoder, "decoder")
        if layer.output_combiner is not None:
            raise ValueError(f"prepare: decoder={decoder!r} already has an output combiner (prepared twice?)")
        if config.out_splits > 1 or signal_scale is not None:
            layer.output_combiner = OutputCombiner(config.act_bits, config.out_splits, signal_scale)
        if config.decoder_in_splits > 1 and isinstance(layer.input_quantizer, ActivationQuantizer):
            layer.input_quantizer = SplitActivationQuantizer(layer.input_quantizer, config.act_bits,
                                                             config.decoder_in_splits)
    return split_activations(model, config)


def split_activations(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Carry the output activations of the modules named in ``config.layer_act_splits`` by several
    ``act_bits`` tensors, in place: every ``output_quantizer`` (an :class:`ActivationQuantizer`) inside them
    becomes a :class:`SplitActivationQuantizer` around it, so its state moves under ``output_quantizer.first``.
    Layers with an :class:`OutputCombiner` keep their output (already split); called after the combiners are
    placed. Returns ``model``."""
    if not config.layer_act_splits:
        return model
    _check_names(model, config.layer_act_splits, "layer_act_splits")
    for name, module in model.named_modules():
        splits = config.act_splits_of(name)
        quantizer = getattr(module, "output_quantizer", None)
        if splits > 1 and type(quantizer) is ActivationQuantizer and getattr(module, "output_combiner", None) is None:
            module.output_quantizer = SplitActivationQuantizer(quantizer, config.act_bits, splits)
    return model


def _check_names(model: nn.Module, per_module: dict, setting: str) -> None:
    names = [name for name, _ in model.named_modules()]
    unknown = [key for key in per_module if not any(inside(n, key) for n in names)]
    if unknown:
        raise ValueError(f"prepare: {setting} names {unknown[0]!r}, which is not a module of {type(model).__name__}")


def _weighted_layer(model: nn.Module, name: str, role: str) -> QuantizedLayer:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]
        raise ValueError(f"prepare: {role}={name!r} is not a submodule of {type(model).__name__}; "
                         f"quantized weighted layers are: {names[:8]}{' ...' if len(names) > 8 else ''}") from None
    if not isinstance(layer, QuantizedLayer):
        raise ValueError(f"prepare: {role}={name!r} is a {type(layer).__name__}, not a weighted layer with a "
                         f"quantized wrapper (Conv, ConvTranspose, Linear, or a type added with fqss_plugin.register)")
    return layer


def freeze(model: nn.Module) -> nn.Module:
    """Replace every learned quantizer by its frozen, export-ready equivalent, in place.

    The frozen quantizers call ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine`` with the learned step and integer zero point as
    buffers: the same kernels the training forward uses, so the output is bit-identical.
    """
    for module_name, module in list(model.named_modules()):
        if isinstance(module, InputSplitter) and not bool(module.initialized):
            raise RuntimeError(f"freeze: {module_name} has not run yet; run a forward pass (calibration) first")
        for child_name, child in list(module.named_children()):
            if isinstance(child, (ActivationQuantizer, WeightQuantizer)) and not bool(child.initialized):
                raise RuntimeError(f"freeze: quantizer {module_name + '.' if module_name else ''}{child_name} has never "
                                   "seen data; run a forward pass (calibration) before freezing")
            if isinstance(child, ActivationQuantizer):
                setattr(module, child_name, FrozenActivationQuantizer.from_quantizer(child))
            elif isinstance(child, WeightQuantizer):
                setattr(module, child_name, FrozenWeightQuantizer.from_quantizer(child))
    return model
