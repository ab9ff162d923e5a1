"""Quantized wrappers for SpeechBrain's own modules (SepFormer and the dual-path family), registered on import.

So that :func:`fqss_plugin.prepare` quantizes every computation of a SepFormer, including the ones
that upstream code writes as plain tensor arithmetic inside ``forward``:

==================================  ===============================================================
upstream                            quantized here
==================================  ===============================================================
``dual_path.Encoder``               conv (``conv1d``: input splitter / input quantizer) then ReLU
                                    with its own output quantizer (the encoder output ``mix_w``)
``dual_path.Decoder``               a ``ConvTranspose1d`` *subclass*: quantized weight, an input
                                    quantizer on the mix x mask product it receives, output combiner
``Dual_Path_Model``                 gate product ``output * gate``, overlap-add ``_over_add``,
                                    global positional-encoding sum (when enabled)
``Dual_Computation_Block``          residual sums ``intra + x`` and ``inter + intra``
``SBTransformerBlock``              positional-encoding sum ``x + pos_enc``
``TransformerEncoderLayer``         both residual sums (after attention and after the FFN)
``GlobalLayerNorm``,                output quantized, statistics and affine in float (as GroupNorm)
``CumulativeLayerNorm``
``PositionalEncoding``              the sinusoidal table (a constant) gets an output quantizer
==================================  ===============================================================

The core already converts what these contain: ``nn.MultiheadAttention`` (inside
``sb.nnet.attention.MultiheadAttention``: q/k/v, logits, softmax, attn x V, output projection),
``nn.Linear`` (FFN, inside ``sb.nnet.linear.Linear``), ``nn.LayerNorm`` (inside
``sb.nnet.normalization.LayerNorm``), ``nn.GroupNorm``, ``nn.Conv1d/2d``, ``nn.PReLU``,
``nn.ReLU``, ``nn.Tanh``, ``nn.Sigmoid``.
"""
from __future__ import annotations

from typing import Optional

import torch
from speechbrain.lobes.models.dual_path import (CumulativeLayerNorm, Decoder, Dual_Computation_Block, Dual_Path_Model,
                                                Encoder, GlobalLayerNorm, SBTransformerBlock)
from speechbrain.lobes.models.transformer.Transformer import PositionalEncoding, TransformerEncoderLayer
from torch import nn

from ..quant import QuantConfig, register
from ..quant.layers import (NORM_INTERNALS, Add, Mul, OutputQuantized, QAdd, QConvTranspose1d, QMul, QReLU,
                            QuantizedLayer, QuantizedModule, activation_quantizer)

def _add(config: QuantConfig) -> QAdd:
    return QAdd.convert_(Add(), config)


class QSBEncoder(QuantizedModule, Encoder):
    """``dual_path.Encoder``: its ``conv1d`` child is converted by ``prepare`` (and carries the input
    splitter); the ReLU after it, a functional call upstream, is a :class:`QReLU` module here, so
    the encoder output (the ``mix_w`` of the separation Brain) is on a grid."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.relu = QReLU.convert_(nn.ReLU(), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.unsqueeze(1)
        return self.relu(self.conv1d(x))


class QSBDecoder(QConvTranspose1d, Decoder):
    """``dual_path.Decoder`` (a ``ConvTranspose1d`` subclass that reshapes its input and output).

    Besides the weight and output quantizers of a transposed conv, it quantizes its *input*: the
    separation Brain (and ``SepformerSeparation.separate_batch``) feed it ``mix_w * est_mask``, a
    product computed outside any module; quantizing it where it is consumed makes the stock
    inference code fully quantized too.
    """

    def _init_quantization(self, config: QuantConfig) -> None:
        super()._init_quantization(config)
        self.input_quantizer = activation_quantizer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            raise RuntimeError(f"{type(self).__name__} accepts 2D or 3D input, got shape {tuple(x.shape)}")
        out = QuantizedLayer.forward(self, x if x.dim() == 3 else x.unsqueeze(1))
        # upstream's squeeze: [B, 1, T] -> [B, T], also for B = 1
        return out.squeeze(1) if out.squeeze().dim() == 1 else out.squeeze()


class QSBGlobalLayerNorm(OutputQuantized, GlobalLayerNorm):
    """SpeechBrain's global layer norm (``norm: gln``) with a quantized output."""

    float_internals = NORM_INTERNALS


class QSBCumulativeLayerNorm(OutputQuantized, CumulativeLayerNorm):
    """SpeechBrain's channel-wise layer norm (``norm: cln``) with a quantized output."""

    float_internals = NORM_INTERNALS


class QSBPositionalEncoding(OutputQuantized, PositionalEncoding):
    """The sinusoidal positional table (a constant) on a grid, like any constant an integer engine stores."""


class QTransformerEncoderLayer(QuantizedModule, TransformerEncoderLayer):
    """A SpeechBrain transformer encoder layer whose two residual sums are quantized.

    ``(pre-/post-)norm -> self-attention -> Q(src + attn) -> (norm) -> FFN -> Q(src + ffn)``;
    the attention, FFN and norms are quantized by the core wrappers of their torch modules.
    """

    def _init_quantization(self, config: QuantConfig) -> None:
        self.attention_residual = _add(config)
        self.ffn_residual = _add(config)

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, pos_embs: Optional[torch.Tensor] = None):
        pre_norm = self.normalize_before
        attn_in = self.norm1(src) if pre_norm else src
        attn_out, attention = self.self_att(attn_in, attn_in, attn_in, attn_mask=src_mask,
                                            key_padding_mask=src_key_padding_mask, pos_embs=pos_embs)
        src = self.attention_residual(src, self.dropout1(attn_out))
        if not pre_norm:
            src = self.norm1(src)
        ffn_out = self.pos_ffn(self.norm2(src) if pre_norm else src)
        out = self.ffn_residual(src, self.dropout2(ffn_out))
        if not pre_norm:
            out = self.norm2(out)
        return out, attention


class QSBTransformerBlock(QuantizedModule, SBTransformerBlock):
    """``SBTransformerBlock`` with the positional-encoding sum ``x + pos_enc`` quantized."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.pos_add = _add(config) if self.use_positional_encoding else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_positional_encoding:
            x = self.pos_add(x, self.pos_enc(x))
        return self.mdl(x)[0]


class QDualComputationBlock(QuantizedModule, Dual_Computation_Block):
    """One intra-chunk + inter-chunk stage of the dual-path model with quantized residual sums."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.intra_residual = _add(config) if self.skip_around_intra else None
        self.inter_residual = _add(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, K, S = x.shape
        # within chunks: sequences of length K, one per (example, chunk)
        intra = self.intra_mdl(x.permute(0, 3, 2, 1).reshape(B * S, K, N))
        if self.linear_layer_after_inter_intra:
            intra = self.intra_linear(intra)
        intra = intra.reshape(B, S, K, N).permute(0, 3, 2, 1).contiguous()
        if self.norm is not None:
            intra = self.intra_norm(intra)
        if self.skip_around_intra:
            intra = self.intra_residual(intra, x)
        # across chunks: sequences of length S, one per (example, position in chunk)
        inter = self.inter_mdl(intra.permute(0, 2, 3, 1).reshape(B * K, S, N))
        if self.linear_layer_after_inter_intra:
            inter = self.inter_linear(inter)
        inter = inter.reshape(B, K, S, N).permute(0, 3, 1, 2).contiguous()
        if self.norm is not None:
            inter = self.inter_norm(inter)
        return self.inter_residual(inter, intra)


class QDual_Path_Model(QuantizedModule, Dual_Path_Model):
    """The dual-path mask network with its gate product, overlap-add and positional sum quantized."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.gate_product = QMul.convert_(Mul(), config)
        self.overlap_add = _add(config)
        self.global_pos_add = _add(config) if self.use_global_pos_enc else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1d(self.norm(x))                                   # [B, N, L]
        if self.use_global_pos_enc:
            pos = self.pos_enc(x.transpose(1, -1)).transpose(1, -1)
            x = self.global_pos_add(pos, x * (x.size(1) ** 0.5))
        x, gap = self._Segmentation(x, self.K)                          # [B, N, K, S]
        for block in self.dual_mdl:
            x = block(x)
        x = self.conv2d(self.prelu(x))                                  # [B, N*spks, K, S]
        B, _, K, S = x.shape
        x = self._over_add(x.reshape(B * self.num_spks, -1, K, S), gap)  # [B*spks, N, L]
        x = self.gate_product(self.output(x), self.output_gate(x))
        x = self.end_conv1x1(x)
        _, N, L = x.shape
        x = self.activation(x.reshape(B, self.num_spks, N, L))
        return x.transpose(0, 1)                                        # [spks, B, N, L]

    def _over_add(self, input: torch.Tensor, gap: int) -> torch.Tensor:
        B, N, K, S = input.shape
        P = K // 2
        frames = input.transpose(2, 3).reshape(B, N, -1, 2 * K)
        first = frames[..., :K].reshape(B, N, -1)[..., P:]
        second = frames[..., K:].reshape(B, N, -1)[..., :-P]
        out = self.overlap_add(first, second)
        return out[..., :-gap] if gap > 0 else out


for _float_type, _wrapper in [
    (Encoder, QSBEncoder), (Decoder, QSBDecoder), (GlobalLayerNorm, QSBGlobalLayerNorm),
    (CumulativeLayerNorm, QSBCumulativeLayerNorm), (PositionalEncoding, QSBPositionalEncoding),
    (TransformerEncoderLayer, QTransformerEncoderLayer),
    (SBTransformerBlock, QSBTransformerBlock), (Dual_Computation_Block, QDualComputationBlock),
    (Dual_Path_Model, QDual_Path_Model),
]:
    register(_float_type, _wrapper)
