"""Quantized wrappers for Asteroid's own modules.

Importing this module registers wrappers so that :func:`fqss_plugin.prepare` fully covers
Asteroid's ``ConvTasNet`` and ``DPTNet`` (and every ``BaseEncoderMaskerDecoder`` built from the
same parts):

* the filterbank ``Encoder``/``Decoder`` of ``asteroid_filterbanks`` (an ``F.conv1d`` /
  ``F.conv_transpose1d`` on the filterbank's parameter): quantized filters, input splitter on the
  encoder, output combiner on the decoder. The decoder also quantizes its *input*: that is the
  output of the model's mask multiplication (``est_masks * tf_rep``), which has no module;
* the multichannel decoder of :class:`~fqss_plugin.asteroid.stereo.StereoConvTasNet` (a transposed conv over
  every source's masked representation): quantized filters, output combiner, and the same quantized input
  (the mask product); its encoder is a plain ``Conv1d``, quantized by the core;
* ``GlobLN`` / ``ChanLN``: output quantized, statistics and affine in float like ``GroupNorm``;
* ``TDConvNet``: the residual and skip-connection sums of its forward pass become ``QAdd``;
* DPTNet's ``ImprovedTransformedLayer`` (its two residual sums) and ``DPTransformer`` (the
  overlap-add ``fold`` and the ``tanh x sigmoid`` gate); attention and LSTM internals are quantized
  by the core's ``QMultiheadAttention`` and ``QLSTM``.

:func:`fqss_plugin.asteroid.prepare_model` quantizes an Asteroid model with these wrappers.
"""
from __future__ import annotations

import torch
from asteroid.masknn.attention import DPTransformer, ImprovedTransformedLayer
from asteroid.masknn.convolutional import TDConvNet
from asteroid.masknn.norms import ChanLN, GlobLN
from asteroid_filterbanks.enc_dec import Decoder, Encoder, multishape_conv1d, multishape_conv_transpose1d
from torch import nn

from ..quant import QuantConfig, register
from ..quant.layers import (NORM_INTERNALS, Add, Mul, OutputQuantized, QAdd, QConvTranspose1d, QMul, QuantizedLayer,
                            QuantizedModule, activation_quantizer)
from .stereo import MultichannelDecoder

class QGlobLN(OutputQuantized, GlobLN):
    """Asteroid's global layer norm with a quantized output."""

    float_internals = NORM_INTERNALS


class QChanLN(OutputQuantized, ChanLN):
    """Asteroid's channel-wise layer norm with a quantized output."""

    float_internals = NORM_INTERNALS


class QFilterbankEncoder(QuantizedLayer, Encoder):
    """Filterbank analysis ``conv1d(x, filters)`` with quantized filters (``weight`` = the filters)."""

    bias = None

    @property
    def weight(self) -> torch.Tensor:
        return self.get_filters()

    def linear_op(self, x, weight, bias):
        spec = multishape_conv1d(self.filterbank.pre_analysis(x), filters=weight, stride=self.stride,
                                 padding=self.padding, as_conv1d=self.as_conv1d)
        return self.filterbank.post_analysis(spec)


class QFilterbankDecoder(QuantizedLayer, Decoder):
    """Filterbank synthesis (overlap-add) with quantized filters and a quantized input.

    The input quantizer puts the masked representation (the model's mask product) on a grid.
    """

    bias = None
    weight_axis = 1

    def _init_quantization(self, config: QuantConfig) -> None:
        super()._init_quantization(config)
        self.input_quantizer = activation_quantizer(config)

    @property
    def weight(self) -> torch.Tensor:
        return self.get_filters()

    def linear_op(self, x, weight, bias):
        wav = multishape_conv_transpose1d(self.filterbank.pre_synthesis(x), weight, stride=self.stride,
                                          padding=self.padding, output_padding=self.output_padding)
        return self.filterbank.post_synthesis(wav)

    def forward(self, spec: torch.Tensor, length: int | None = None) -> torch.Tensor:
        wav = QuantizedLayer.forward(self, spec)
        return wav if length is None else wav[..., :min(length, wav.shape[-1])]


class QMultichannelDecoder(QConvTranspose1d, MultichannelDecoder):
    """The multichannel decoder with quantized filters and a quantized input (the model's mask product)."""

    def _init_quantization(self, config: QuantConfig) -> None:
        super()._init_quantization(config)
        self.input_quantizer = activation_quantizer(config)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        batch, n_src = spec.shape[:2]
        wav = QuantizedLayer.forward(self, spec.reshape(batch * n_src, *spec.shape[2:]))
        return wav.reshape(batch, n_src, *wav.shape[1:])


class QTDConvNet(QuantizedModule, TDConvNet):
    """ConvTasNet's temporal conv net with quantized residual and skip-connection sums."""

    def _init_quantization(self, config: QuantConfig) -> None:
        blocks = len(self.TCN)
        self.residual_adds = nn.ModuleList(QAdd.convert_(Add(), config) for _ in range(blocks))
        self.skip_adds = nn.ModuleList(QAdd.convert_(Add(), config) for _ in range(blocks - 1)) \
            if self.skip_chan else None

    def forward(self, mixture_w: torch.Tensor) -> torch.Tensor:
        batch, _, n_frames = mixture_w.size()
        output = self.bottleneck(mixture_w)
        skip_connection = None
        for i, layer in enumerate(self.TCN):
            tcn_out = layer(output)
            if self.skip_chan:
                residual, skip = tcn_out
                skip_connection = skip if skip_connection is None else self.skip_adds[i - 1](skip_connection, skip)
            else:
                residual = tcn_out
            output = self.residual_adds[i](output, residual)
        score = self.mask_net(skip_connection if self.skip_chan else output)
        score = score.view(batch, self.n_src, self.out_chan, n_frames)
        return self.output_act(score)


class QImprovedTransformedLayer(QuantizedModule, ImprovedTransformedLayer):
    """DPTNet's transformer layer (attention, then a BiLSTM feed-forward) with quantized residual sums.

    Attention and LSTM are :class:`~fqss_plugin.quant.QMultiheadAttention` /
    :class:`~fqss_plugin.quant.QLSTM` through the registry; this wrapper adds the two sums.
    """

    def _init_quantization(self, config: QuantConfig) -> None:
        self.attention_residual = QAdd.convert_(Add(), config)
        self.feedforward_residual = QAdd.convert_(Add(), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tomha = x.permute(2, 0, 1)
        out = self.mha(tomha, tomha, tomha)[0]
        x = self.norm_mha(self.attention_residual(self.dropout(out.permute(1, 2, 0)), x))
        out = self.linear(self.dropout(self.activation(self.recurrent(x.transpose(1, -1))[0])))
        return self.norm_ff(self.feedforward_residual(self.dropout(out.transpose(1, -1)), x))


class QDPTransformer(QuantizedModule, DPTransformer):
    """DPTNet's masker with a quantized overlap-add (``fold``) and a quantized ``tanh x sigmoid`` gate."""

    def _init_quantization(self, config: QuantConfig) -> None:
        self.overlap_add_quantizer = activation_quantizer(config)
        self.gate = QMul.convert_(Mul(), config)

    def forward(self, mixture_w: torch.Tensor) -> torch.Tensor:
        if self.input_layer is not None:
            mixture_w = self.input_layer(mixture_w.transpose(1, 2)).transpose(1, 2)
        mixture_w = self.in_norm(mixture_w)
        n_orig_frames = mixture_w.shape[-1]
        mixture_w = self.ola.unfold(mixture_w)
        batch, _, chunk_size, n_chunks = mixture_w.size()
        for intra, inter in self.layers:
            mixture_w = self.ola.inter_process(self.ola.intra_process(mixture_w, intra), inter)
        output = self.first_out(mixture_w)
        output = output.reshape(batch * self.n_src, self.in_chan, chunk_size, n_chunks)
        output = self.overlap_add_quantizer(self.ola.fold(output, output_size=n_orig_frames))
        output = self.gate(self.net_out(output), self.net_gate(output))
        return self.output_act(output.reshape(batch, self.n_src, self.in_chan, -1))


for _float_type, _wrapper in [(GlobLN, QGlobLN), (ChanLN, QChanLN), (Encoder, QFilterbankEncoder),
                              (Decoder, QFilterbankDecoder), (MultichannelDecoder, QMultichannelDecoder), (TDConvNet, QTDConvNet),
                              (ImprovedTransformedLayer, QImprovedTransformedLayer), (DPTransformer, QDPTransformer)]:
    register(_float_type, _wrapper)

