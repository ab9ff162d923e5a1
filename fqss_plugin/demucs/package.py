"""Quantizing a Demucs model: :func:`prepare_model` for HTDemucs (two branches, two inputs, two outputs)."""
from __future__ import annotations

from demucs.htdemucs import HTDemucs
from torch import nn

from ..quant import QuantConfig, prepare
from ..quant.layers import activation_quantizer
from . import wrappers  # noqa: F401  (registers the wrappers that prepare uses)


def branch_layers(model: HTDemucs) -> tuple[list[str], list[str]]:
    """The first weighted layers of both branches (``encoder.0.conv``, ``tencoder.0.conv``) and their last ones
    (``decoder.<last>.conv_tr``, ``tdecoder.<last>.conv_tr``)."""
    return ([f"encoder.0.conv", f"tencoder.0.conv"],
            [f"decoder.{len(model.decoder) - 1}.conv_tr", f"tdecoder.{len(model.tdecoder) - 1}.conv_tr"])


def prepare_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Quantize an ``HTDemucs`` in place and return it: every layer through the registered wrappers, and an
    8-bit input quantizer on the first conv of each branch (the inputs are the mean/std-normalised
    spectrogram and waveform). The split inputs and combined outputs of the FQSS method are not applied
    to HTDemucs yet: ``in_splits``/``out_splits`` above 1 are refused."""
    config = config or QuantConfig.vanilla()
    if not isinstance(model, HTDemucs):
        raise TypeError(f"fqss_plugin.demucs.prepare_model: expected a demucs HTDemucs, got {type(model).__name__}")
    if config.in_splits > 1 or config.out_splits > 1 or config.decoder_in_splits > 1 or config.encoder_out_splits > 1:
        raise ValueError("fqss_plugin.demucs.prepare_model: split inputs/outputs are not supported for HTDemucs yet; "
                         "use QuantConfig.vanilla() (one 8-bit input quantizer per branch)")
    prepare(model, config)
    for idx, layer in enumerate(model.encoder):       # the time branch joins where its encoder layer is empty
        if not (idx < len(model.tencoder) and model.tencoder[idx].empty):
            layer.inject_add = None
    firsts, _ = branch_layers(model)
    for name in firsts:
        model.get_submodule(name).input_quantizer = activation_quantizer(config)
    return model
