"""SpeechBrain inference packages of a (quantized) SepFormer, and the SepFormer as one waveform module.

* :func:`save_pretrained_separator` writes a package (``hyperparams.yaml`` + ``encoder/masknet/decoder.ckpt``)
  that SpeechBrain's own ``SepformerSeparation.from_hparams(source=...)`` reloads;
* :class:`QuantizedSepformerSeparation` loads one and checks that its quantizers came from the checkpoint;
* :class:`SepformerWaveform`: encoder, mask net and decoder as one ``[B, T] -> [B, n_src, T]`` module
  (the signature of an Asteroid model), e.g. for :func:`fqss_plugin.export.to_onnx`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from speechbrain.inference.separation import SepformerSeparation
from speechbrain.lobes.models.dual_path import CumulativeLayerNorm, Dual_Path_Model, GlobalLayerNorm, SBTransformerBlock
from torch import nn

from ..atomic import atomic_save
from ..quant import QuantConfig
from ..quant.state import is_quantized, uninitialized
from .hparams import MODULE_KEYS, quantize_inplace


def _norm_name(norm: nn.Module) -> str:
    if isinstance(norm, GlobalLayerNorm):
        return "gln"
    if isinstance(norm, CumulativeLayerNorm):
        return "cln"
    if isinstance(norm, nn.GroupNorm):
        return "ln"
    return "bn"


def _transformer_block_args(block: nn.Module, where: str) -> dict:
    if not isinstance(block, SBTransformerBlock):
        raise NotImplementedError(f"save_pretrained_separator: {where} is a {type(block).__name__}; only "
                                  f"SBTransformerBlock (SepFormer) mask nets are supported")
    layer = block.mdl.layers[0]
    attention = layer.self_att.att
    if not isinstance(attention, nn.MultiheadAttention):
        raise NotImplementedError(f"save_pretrained_separator: {where} uses {type(layer.self_att).__name__}; only "
                                  f"regularMHA is supported")
    return {"num_layers": len(block.mdl.layers), "d_model": attention.embed_dim, "nhead": attention.num_heads,
            "d_ffn": layer.pos_ffn.ffn[0].out_features, "dropout": 0.0,
            "activation": "gelu" if isinstance(layer.pos_ffn.ffn[1], nn.GELU) else "relu",
            "use_positional_encoding": bool(block.use_positional_encoding),
            "norm_before": bool(layer.normalize_before)}


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _mapping(values: dict, indent: int = 4) -> str:
    return "\n".join(" " * indent + f"{k}: {_yaml_value(v)}" for k, v in values.items())


def save_pretrained_separator(out_dir: str | os.PathLike, modules, config: QuantConfig | None, sample_rate: int,
                              num_spks: int | None = None) -> Path:
    """Write a SepFormer inference package that ``SepformerSeparation.from_hparams(source=out_dir)`` loads.

    ``out_dir`` gets ``hyperparams.yaml`` (the architecture, read from the modules, plus, for a
    quantized model, the quantization config and the ``quantize_inplace`` line) and
    ``encoder.ckpt``/``masknet.ckpt``/``decoder.ckpt`` (state dicts, quantizer state included).
    ``config=None`` writes a float package. Reload a quantized one with
    :class:`QuantizedSepformerSeparation` (or the stock ``SepformerSeparation``).
    """
    encoder, masknet, decoder = (getattr(modules[k], "module", modules[k]) for k in MODULE_KEYS)
    if not isinstance(masknet, Dual_Path_Model):
        raise NotImplementedError(f"save_pretrained_separator: masknet is a {type(masknet).__name__}, "
                                  f"not a SpeechBrain Dual_Path_Model")
    block = masknet.dual_mdl[0]
    num_spks = num_spks or masknet.num_spks
    conv = encoder.conv1d
    encoder_args = {"kernel_size": conv.kernel_size[0], "out_channels": conv.out_channels,
                    "in_channels": conv.in_channels}
    masknet_args = {"num_spks": num_spks, "in_channels": masknet.conv1d.in_channels,
                    "out_channels": masknet.conv1d.out_channels, "num_layers": masknet.num_layers, "K": masknet.K,
                    "norm": _norm_name(masknet.norm), "skip_around_intra": bool(block.skip_around_intra),
                    "linear_layer_after_inter_intra": bool(block.linear_layer_after_inter_intra),
                    "use_global_pos_enc": bool(masknet.use_global_pos_enc)}
    decoder_args = {"in_channels": decoder.in_channels, "out_channels": decoder.out_channels,
                    "kernel_size": decoder.kernel_size[0], "stride": decoder.stride[0],
                    "bias": decoder.bias is not None}
    intra = _transformer_block_args(block.intra_mdl, "masknet.dual_mdl.0.intra_mdl")
    inter = _transformer_block_args(block.inter_mdl, "masknet.dual_mdl.0.inter_mdl")
    text = f"""# SepFormer separator written by fqss_plugin.speechbrain.save_pretrained_separator.
# Load it with speechbrain.inference.separation.SepformerSeparation.from_hparams(source=<this folder>)
# (or fqss_plugin.speechbrain.QuantizedSepformerSeparation, which also checks the quantizer state).
sample_rate: {sample_rate}
num_spks: {num_spks}

Encoder: !new:speechbrain.lobes.models.dual_path.Encoder
{_mapping(encoder_args)}

SBtfintra: !new:speechbrain.lobes.models.dual_path.SBTransformerBlock
{_mapping(intra)}

SBtfinter: !new:speechbrain.lobes.models.dual_path.SBTransformerBlock
{_mapping(inter)}

MaskNet: !new:speechbrain.lobes.models.dual_path.Dual_Path_Model
{_mapping(masknet_args)}
    intra_model: !ref <SBtfintra>
    inter_model: !ref <SBtfinter>

Decoder: !new:speechbrain.lobes.models.dual_path.Decoder
{_mapping(decoder_args)}

modules:
    encoder: !ref <Encoder>
    masknet: !ref <MaskNet>
    decoder: !ref <Decoder>
"""
    if config is not None:
        text += f"""
fqss: !new:fqss_plugin.QuantConfig
{_mapping(config.to_dict())}

quantized: !apply:fqss_plugin.speechbrain.quantize_inplace
    modules: !ref <modules>
    config: !ref <fqss>
    keep_float_teacher: False
"""
    text += """
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        encoder: !ref <Encoder>
        masknet: !ref <MaskNet>
        decoder: !ref <Decoder>
"""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, module in zip(MODULE_KEYS, (encoder, masknet, decoder)):
        atomic_save(module.state_dict(), out / f"{key}.ckpt")
    (out / "hyperparams.yaml").write_text(text)
    return out


def separate_sources(mix: torch.Tensor, encoder: nn.Module, masknet: nn.Module, decoder: nn.Module,
                     num_spks: int) -> torch.Tensor:
    """``SepformerSeparation.separate_batch``: ``[B, T]`` -> ``[B, T, num_spks]``, the estimates cut or
    zero-padded to ``T`` (padded by ``T`` and cut, the same values without a length-dependent branch,
    so that a traced graph is right for every length)."""
    mix_w = encoder(mix)
    sep_h = torch.stack([mix_w] * num_spks) * masknet(mix_w)
    est_source = torch.stack([decoder(sep_h[i]) for i in range(num_spks)], dim=-1)
    return F.pad(est_source, (0, 0, 0, mix.shape[1]))[:, :mix.shape[1]]


class SepformerWaveform(nn.Module):
    """A SepFormer's encoder, masknet and decoder as one separator ``[B, T] -> [B, num_spks, T]`` (the
    signature of an Asteroid model), e.g. for :func:`fqss_plugin.export.to_onnx`."""

    def __init__(self, encoder: nn.Module, masknet: nn.Module, decoder: nn.Module, num_spks: int,
                 sample_rate: int | None = None) -> None:
        super().__init__()
        self.encoder, self.masknet, self.decoder = encoder, masknet, decoder
        self.num_spks, self.sample_rate = num_spks, sample_rate

    @classmethod
    def from_separator(cls, separator: SepformerSeparation) -> SepformerWaveform:
        """From a loaded inference package (``SepformerSeparation``/:class:`QuantizedSepformerSeparation`)."""
        mods = separator.mods
        return cls(mods.encoder, mods.masknet, mods.decoder, int(separator.hparams.num_spks),
                   int(separator.hparams.sample_rate))

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return separate_sources(mix, self.encoder, self.masknet, self.decoder, self.num_spks).transpose(1, 2)


def prepare_waveform(model: SepformerWaveform, config: QuantConfig) -> SepformerWaveform:
    """:func:`quantize_inplace` on the modules of ``model`` (in place; no teacher copy); returns ``model``."""
    quantize_inplace({"encoder": model.encoder, "masknet": model.masknet, "decoder": model.decoder}, config,
                     keep_float_teacher=False)
    return model


def load_quantized_separator(package: str | os.PathLike) -> SepformerWaveform:
    """The quantized SepFormer of an inference package directory (:func:`save_pretrained_separator`), on CPU."""
    import tempfile
    with tempfile.TemporaryDirectory() as savedir:
        separator = QuantizedSepformerSeparation.from_hparams(source=str(Path(package).resolve()), savedir=savedir,
                                                              run_opts={"device": "cpu"})
    return SepformerWaveform.from_separator(separator).eval()


class QuantizedSepformerSeparation(SepformerSeparation):
    """``SepformerSeparation`` for fqss packages: the same ``separate_batch``/``separate_file``, and a
    check at load time that the modules are quantized and their quantizers came from the checkpoint
    (a float checkpoint in a quantized yaml would otherwise calibrate on the first input)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(is_quantized(m) for m in self.mods.values()):
            raise ValueError("QuantizedSepformerSeparation: the hyperparams.yaml does not quantize the modules "
                             "(no quantize_inplace line); use SepformerSeparation for float models")
        fresh = [f"{key}.{name}" for key, module in self.mods.items() for name in uninitialized(module)]
        if fresh:
            raise ValueError(f"QuantizedSepformerSeparation: {len(fresh)} quantizers were not in the checkpoints "
                             f"(e.g. {fresh[0]}): the encoder/masknet/decoder.ckpt are float weights, not a "
                             f"trained fqss model")
