"""Quantized wrappers for Demucs 4's own modules (HTDemucs), registered on import.

So that :func:`fqss_plugin.demucs.prepare_model` quantizes every computation between the STFT and
the iSTFT of an ``HTDemucs``, and its time branch, including what upstream writes as plain tensor
arithmetic inside ``forward``:

==================================  ===============================================================
upstream                            quantized here
==================================  ===============================================================
``HEncLayer``                       the time-branch injection sum, GELU after the first norm, GLU
                                    after the 1x1 rewrite conv (modules with output quantizers)
``HDecLayer``                       the skip-connection sum, GLU, GELU after the transposed conv
``DConv``                           the residual sum of each branch (its GELU/GLU are modules)
``LayerScale``                      the per-channel scale, quantized like a weight, and its output
``ScaledEmbedding``                 the frequency embedding table (a constant) gets an output quantizer
``MyGroupNorm``                     output quantized, statistics and affine in float (as GroupNorm)
``MyTransformerEncoderLayer``,      both residual sums, the feed-forward activation (a module)
``CrossTransformerEncoderLayer``
``CrossTransformerEncoder``         the positional embeddings (quantized constants) and their sums
``HTDemucs``                        the frequency-embedding sum (both branches' inputs and outputs:
                                    :func:`fqss_plugin.demucs.prepare_model`)
==================================  ===============================================================

Float by design: the STFT/iSTFT (complex), the per-example input statistics (mean, std) and the
output de-normalisation, the mask application and the sum of the two branches' waveforms.
The core converts what these contain (Conv1d/2d, ConvTranspose1d/2d, Linear, GroupNorm, LayerNorm,
GELU, GLU, ``nn.MultiheadAttention``).
"""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from demucs.demucs import DConv
from demucs.hdemucs import HDecLayer, HEncLayer
from demucs.hdemucs import ScaledEmbedding as HScaledEmbedding
from demucs.htdemucs import HTDemucs
from demucs.transformer import (CrossTransformerEncoder, CrossTransformerEncoderLayer, LayerScale, MyGroupNorm,
                                MyTransformerEncoderLayer, create_2d_sin_embedding)
from demucs.transformer import ScaledEmbedding as TScaledEmbedding
from einops import rearrange
from torch import nn

from ..quant import QuantConfig, register
from ..quant.layers import NORM_INTERNALS, Add, OutputQuantized, QAdd, QGELU, QGLU, QReLU, QuantizedModule
from ..quant.quantizers import activation_quantizer, weight_quantizer


def _add(config: QuantConfig) -> QAdd:
    return QAdd.convert_(Add(), config)


def _gelu(config: QuantConfig) -> QGELU:
    return QGELU.convert_(nn.GELU(), config)


def _glu(config: QuantConfig) -> QGLU:
    return QGLU.convert_(nn.GLU(dim=1), config)


class QMyGroupNorm(OutputQuantized, MyGroupNorm):
    """Demucs' channel-last group norm with a quantized output."""

    float_internals = NORM_INTERNALS


class QHScaledEmbedding(OutputQuantized, HScaledEmbedding):
    """The frequency embedding (a table: a constant at inference) with a quantized output."""


class QTScaledEmbedding(OutputQuantized, TScaledEmbedding):
    """The transformer's learned positional embedding with a quantized output."""


class QLayerScale(QuantizedModule, LayerScale):
    """``scale * x`` per channel: the scale quantized like a weight (per channel), the product's output quantized.

    ``y = Q_a(Q_w(s)_c · x)``: an element-wise product by a per-channel constant, which integer engines
    fold into the requantization of the next op or run as a Mul of two int8 tensors."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.scale_quantizer = weight_quantizer(self.scale.numel(), config)
        self.output_quantizer = activation_quantizer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_quantizer(self.scale)
        return self.output_quantizer(scale * x if self.channel_last else scale[:, None] * x)


class QDConv(QuantizedModule, DConv):
    """Demucs' residual branch ``x + layer(x)`` per layer, with the sums quantized."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.residual_adds = nn.ModuleList(_add(config) for _ in self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, add in zip(self.layers, self.residual_adds):
            x = add(x, layer(x))
        return x


class QHEncLayer(QuantizedModule, HEncLayer):
    """An HTDemucs encoder layer: conv, (+ the time branch), norm, GELU, DConv, 1x1 conv, norm, GLU."""

    def _init_quantization(self, config: QuantConfig) -> None:
        # only a frequency-branch layer can receive the time branch (prepare_model removes the sums never used)
        self.inject_add = _add(config) if self.freq else None
        self.gelu = _gelu(config)
        self.glu = _glu(config)

    def forward(self, x: torch.Tensor, inject: torch.Tensor | None = None) -> torch.Tensor:
        if not self.freq and x.dim() == 4:
            x = x.view(x.shape[0], -1, x.shape[-1])
        if not self.freq and x.shape[-1] % self.stride:
            x = F.pad(x, (0, self.stride - x.shape[-1] % self.stride))
        y = self.conv(x)
        if self.empty:
            return y
        if inject is not None:
            if self.inject_add is None:
                raise RuntimeError("fqss: this HEncLayer was prepared without the time-branch injection sum")
            y = self.inject_add(y, inject[:, :, None] if inject.dim() == 3 and y.dim() == 4 else inject)
        y = self.gelu(self.norm1(y))
        if self.dconv:
            y = _freq_as_batch(self.dconv, y) if self.freq else self.dconv(y)
        return self.glu(self.norm2(self.rewrite(y))) if self.rewrite else y


class QHDecLayer(QuantizedModule, HDecLayer):
    """An HTDemucs decoder layer: (+ skip), 1x1 conv, norm, GLU, DConv, transposed conv, norm, GELU."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.skip_add = _add(config)
        self.glu = _glu(config)
        self.gelu = None if self.last else _gelu(config)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, length: int):
        if self.freq and x.dim() == 3:
            x = x.view(x.shape[0], self.chin, -1, x.shape[-1])
        if not self.empty:
            x = self.skip_add(x, skip)
            y = self.glu(self.norm1(self.rewrite(x))) if self.rewrite else x
            if self.dconv:
                y = _freq_as_batch(self.dconv, y) if self.freq else self.dconv(y)
        else:
            y = x
        z = self.norm2(self.conv_tr(y))
        if self.freq:
            if self.pad:
                z = z[..., self.pad:-self.pad, :]
        else:
            z = z[..., self.pad:self.pad + length]
        return (z if self.last else self.gelu(z)), y


def _freq_as_batch(dconv: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Run a DConv over ``[B, C, F, T]`` with the frequencies folded into the batch (as upstream)."""
    batch, channels, freqs, frames = y.shape
    y = dconv(y.permute(0, 2, 1, 3).reshape(-1, channels, frames))
    return y.view(batch, freqs, channels, frames).permute(0, 2, 1, 3)


class _QTransformerLayer(QuantizedModule):
    """The residual sums and the feed-forward activation (a function upstream, a module here) of Demucs'
    transformer layers."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.attention_add = _add(config)
        self.feedforward_add = _add(config)
        gelu = self.activation is F.gelu or isinstance(self.activation, nn.GELU)
        self.activation = _gelu(config) if gelu else QReLU.convert_(nn.ReLU(), config)


class QMyTransformerEncoderLayer(_QTransformerLayer, MyTransformerEncoderLayer):
    """Demucs' self-attention layer (norm first or after), with quantized residual sums."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None):
        if self.sparse:
            raise NotImplementedError("fqss: sparse attention of Demucs' transformer is not supported")
        x = src
        if self.norm_first:
            x = self.attention_add(x, self.gamma_1(self._sa_block(self.norm1(x), src_mask, src_key_padding_mask)))
            x = self.feedforward_add(x, self.gamma_2(self._ff_block(self.norm2(x))))
            return self.norm_out(x) if self.norm_out else x
        x = self.norm1(self.attention_add(x, self.gamma_1(self._sa_block(x, src_mask, src_key_padding_mask))))
        return self.norm2(self.feedforward_add(x, self.gamma_2(self._ff_block(x))))


class QCrossTransformerEncoderLayer(_QTransformerLayer, CrossTransformerEncoderLayer):
    """Demucs' cross-attention layer (one branch attends to the other), with quantized residual sums."""

    def forward(self, q, k, mask=None):
        if self.sparse:
            raise NotImplementedError("fqss: sparse attention of Demucs' transformer is not supported")
        if self.norm_first:
            x = self.attention_add(q, self.gamma_1(self._ca_block(self.norm1(q), self.norm2(k), mask)))
            x = self.feedforward_add(x, self.gamma_2(self._ff_block(self.norm3(x))))
            return self.norm_out(x) if self.norm_out else x
        x = self.norm1(self.attention_add(q, self.gamma_1(self._ca_block(q, k, mask))))
        return self.norm2(self.feedforward_add(x, self.gamma_2(self._ff_block(x))))


class QCrossTransformerEncoder(QuantizedModule, CrossTransformerEncoder):
    """The cross-domain transformer: its positional embeddings (computed constants) are quantized, and
    their sums with the two branches."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.position_quantizer = activation_quantizer(config)
        self.position_quantizer_t = activation_quantizer(config)
        self.position_add = _add(config)
        self.position_add_t = _add(config)

    def forward(self, x, xt):
        batch, channels, freqs, frames = x.shape
        position = create_2d_sin_embedding(channels, freqs, frames, x.device, self.max_period)
        position = rearrange(position, "b c fr t1 -> b (t1 fr) c")
        x = self.norm_in(rearrange(x, "b c fr t1 -> b (t1 fr) c"))
        x = self.position_add(x, self.position_quantizer(self.weight_pos_embed * position))

        _, _, frames_t = xt.shape
        xt = self.norm_in_t(rearrange(xt, "b c t2 -> b t2 c"))
        position_t = rearrange(self._get_pos_embedding(frames_t, batch, channels, x.device), "t2 b c -> b t2 c")
        xt = self.position_add_t(xt, self.position_quantizer_t(self.weight_pos_embed * position_t))

        for idx in range(self.num_layers):
            if idx % 2 == self.classic_parity:
                x, xt = self.layers[idx](x), self.layers_t[idx](xt)
            else:
                x, xt = self.layers[idx](x, xt), self.layers_t[idx](xt, x)
        return rearrange(x, "b (t1 fr) c -> b c fr t1", t1=frames), rearrange(xt, "b t2 c -> b c t2")


class QHTDemucs(QuantizedModule, HTDemucs):
    """HTDemucs with its frequency-embedding sum quantized; otherwise upstream's ``forward`` on the quantized
    layers: float STFT, per-example mean/std normalisation of both branch inputs, encoders (the time branch
    injected where the strides meet), the cross-domain transformer, decoders with skip sums, float
    de-normalisation, mask, iSTFT and the sum of the two branches."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.freq_emb_add = _add(config)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        mix, z, x, xt, stats, lengths = self.analyse(mix)
        x, xt = self.network(x, xt)
        return self.synthesise(z, x, xt, stats, lengths)

    def analyse(self, mix: torch.Tensor):
        """Float front end: pad to the training segment (eval), STFT, both branch inputs normalised by their
        mean and std. Returns ``(mix, z, x, xt, (mean, std, meant, stdt), (out_length, length_pre_pad))``."""
        length, length_pre_pad = mix.shape[-1], None
        if self.use_train_segment:
            if self.training:
                self.segment = Fraction(mix.shape[-1], self.samplerate)
            else:
                training_length = int(self.segment * self.samplerate)
                if mix.shape[-1] < training_length:
                    length_pre_pad = mix.shape[-1]
                    mix = F.pad(mix, (0, training_length - length_pre_pad))
        out_length = training_length if self.use_train_segment and not self.training else length
        z = self._spec(mix)
        x = self._magnitude(z).to(mix.device)
        mean, std = x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (1e-5 + std)
        meant, stdt = mix.mean(dim=(1, 2), keepdim=True), mix.std(dim=(1, 2), keepdim=True)
        xt = (mix - meant) / (1e-5 + stdt)
        return mix, z, x, xt, (mean, std, meant, stdt), (out_length, length_pre_pad)

    def network(self, x: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized network between the normalised branch inputs and the branch outputs (before
        de-normalisation): encoders (the time branch injected where the strides meet), the cross-domain
        transformer, decoders with skip sums. This is what the int8 export writes."""
        saved, saved_t, lengths, lengths_t = [], [], [], []
        for idx, encode in enumerate(self.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(self.tencoder):
                lengths_t.append(xt.shape[-1])
                xt = self.tencoder[idx](xt)
                if self.tencoder[idx].empty:
                    inject = xt                  # the time branch joins the frequency branch here
                else:
                    saved_t.append(xt)
            x = encode(x, inject)
            if idx == 0 and self.freq_emb is not None:
                emb = self.freq_emb(torch.arange(x.shape[-2], device=x.device)).t()[None, :, :, None].expand_as(x)
                x = self.freq_emb_add(x, self.freq_emb_scale * emb)
            saved.append(x)
        if self.crosstransformer:
            if self.bottom_channels:
                x = rearrange(self.channel_upsampler(rearrange(x, "b c f t-> b c (f t)")), "b c (f t)-> b c f t",
                              f=x.shape[2])
                xt = self.channel_upsampler_t(xt)
            x, xt = self.crosstransformer(x, xt)
            if self.bottom_channels:
                x = rearrange(self.channel_downsampler(rearrange(x, "b c f t-> b c (f t)")),
                              "b c (f t)-> b c f t", f=x.shape[2])
                xt = self.channel_downsampler_t(xt)

        offset = self.depth - len(self.tdecoder)
        for idx, decode in enumerate(self.decoder):
            x, pre = decode(x, saved.pop(-1), lengths.pop(-1))
            if idx >= offset:
                tdec = self.tdecoder[idx - offset]
                if tdec.empty:
                    xt, _ = tdec(pre[:, :, 0], None, lengths_t.pop(-1))
                else:
                    xt, _ = tdec(xt, saved_t.pop(-1), lengths_t.pop(-1))
        return x, xt

    def synthesise(self, z, x, xt, stats, lengths) -> torch.Tensor:
        """Float back end: de-normalisation, the mask on the STFT, iSTFT, the sum of the two branches."""
        (mean, std, meant, stdt), (out_length, length_pre_pad) = stats, lengths
        batch, sources, (freqs, frames) = x.shape[0], len(self.sources), z.shape[-2:]
        x = x.view(batch, sources, -1, freqs, frames) * std[:, None] + mean[:, None]
        x = self._ispec(self._mask(z, x), out_length)
        xt = xt.view(batch, sources, -1, out_length) * stdt[:, None] + meant[:, None]
        x = xt + x
        return x[..., :length_pre_pad] if length_pre_pad else x


for _float_type, _wrapper in [
    (MyGroupNorm, QMyGroupNorm), (HScaledEmbedding, QHScaledEmbedding), (TScaledEmbedding, QTScaledEmbedding),
    (LayerScale, QLayerScale), (DConv, QDConv), (HEncLayer, QHEncLayer), (HDecLayer, QHDecLayer),
    (MyTransformerEncoderLayer, QMyTransformerEncoderLayer),
    (CrossTransformerEncoderLayer, QCrossTransformerEncoderLayer),
    (CrossTransformerEncoder, QCrossTransformerEncoder), (HTDemucs, QHTDemucs),
]:
    register(_float_type, _wrapper)
