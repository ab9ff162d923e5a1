"""Quantizing a Demucs model: :func:`prepare_model` for HTDemucs (two branches: two inputs, two outputs)."""
from __future__ import annotations

import dataclasses

from demucs.htdemucs import HTDemucs
from torch import nn

from ..quant import QuantConfig, prepare
from ..quant.layers import activation_quantizer
from ..quant.signal_io import OutputCombiner, SplitActivationQuantizer
from . import wrappers  # noqa: F401  (registers the wrappers that prepare uses)


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
    normalises its inputs itself, and applies its mask in float after the decoders.
    """
    config = config or QuantConfig.fqss()
    if not isinstance(model, HTDemucs):
        raise TypeError(f"fqss_plugin.demucs.prepare_model: expected a demucs HTDemucs, got {type(model).__name__}")
    prepare(model, dataclasses.replace(config, normalize_input=False))
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
    return model
