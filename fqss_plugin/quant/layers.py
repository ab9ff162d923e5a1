"""Quantized wrappers, one small class per op (in the spirit of ``torch.ao.nn.qat``).

A wrapper *is* its float module (it subclasses it) and is created in place by swapping the
module's class (:meth:`QuantizedModule.convert_`), so parameters keep their upstream names and
objects, every reference to the module sees the quantized version, and a float ``state_dict``
still loads strictly apart from the added quantizer keys.

* :class:`QuantizedLayer` (conv, transposed conv, linear): per-channel quantized weight,
  optional input quantizer (or :class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer`) or
  :class:`~fqss_plugin.quant.signal_io.InputSplitter`, and an output
  :class:`ActivationQuantizer` or :class:`~fqss_plugin.quant.signal_io.OutputCombiner`.
  The bias stays float here and becomes int32 (scale ``s_x·s_w``) at export.
* :class:`OutputQuantized` (norms, activations): the float op, then an output quantizer. Norm
  statistics and affine parameters and PReLU slopes are computed in float, as on integer engines
  that implement these ops with higher-precision internals.
* :class:`Add`, :class:`Mul`, :class:`Concat`: float element-wise ops as modules. Models and
  toolkit adapters put them at call sites that have no module upstream (residual adds, mask
  multiplies); :func:`prepare` turns them into :class:`QAdd`, :class:`QMul`, :class:`QConcat`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .quantizers import activation_quantizer, weight_quantizer
from .registry import register
from .signal_io import SplitActivationQuantizer


NORM_INTERNALS = "norm statistics and affine: float (integer engines use wider internals)"


class QuantizedModule(nn.Module):
    """Base of all wrappers: in-place conversion from the float module.

    ``float_internals`` documents what a wrapper deliberately computes in float (shown by
    :func:`~fqss_plugin.coverage_report`). ``covers_children`` says the wrapper quantizes what its
    submodules compute (e.g. a filterbank layer quantizes the filters its ``filterbank`` child
    holds), so the report does not list those submodules as float.
    """

    float_internals: str | None = None
    covers_children = False

    @classmethod
    def convert_(cls, module: nn.Module, config: QuantConfig) -> nn.Module:
        """Turn ``module`` into an instance of ``cls`` in place and add its quantizers."""
        module.__class__ = cls
        module._init_quantization(config)
        return module

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantConfig | None = None) -> nn.Module:
        """Same as :meth:`convert_`, with the default :class:`QuantConfig`; returns ``module``."""
        return cls.convert_(module, config or QuantConfig())

    def _init_quantization(self, config: QuantConfig) -> None:
        raise NotImplementedError


class QuantizedLayer(QuantizedModule):
    """A weighted layer computing ``Q_out(op(x_q; Q_w(W)) + b)``."""

    weight_axis = 0
    covers_children = True
    float_internals = "bias: float in QAT, int32 (scale s_x*s_w) at export"

    def _init_quantization(self, config: QuantConfig) -> None:
        self.weight_quantizer = weight_quantizer(self.weight.shape[self.weight_axis], config, self.weight_axis)
        self.output_quantizer = activation_quantizer(config)
        self.input_quantizer = None
        self.input_splitter = None
        self.output_combiner = None

    def linear_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The float op with the given weight (used once per input split)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_splitter is not None:
            out = self.input_splitter(x, self)
        elif isinstance(self.input_quantizer, SplitActivationQuantizer):
            out = self.input_quantizer(x, self)
        else:
            if self.input_quantizer is not None:
                x = self.input_quantizer(x)
            out = self.linear_op(x, self.weight_quantizer(self.weight), self.bias)
        if self.output_combiner is not None:
            return self.output_combiner(out, self.output_quantizer)
        return self.output_quantizer(out)


class QConv1d(QuantizedLayer, nn.Conv1d):
    def linear_op(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


class QConv2d(QuantizedLayer, nn.Conv2d):
    def linear_op(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


class QConvTranspose1d(QuantizedLayer, nn.ConvTranspose1d):
    weight_axis = 1

    def linear_op(self, x, weight, bias):
        return F.conv_transpose1d(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


class QConvTranspose2d(QuantizedLayer, nn.ConvTranspose2d):
    weight_axis = 1

    def linear_op(self, x, weight, bias):
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


class QLinear(QuantizedLayer, nn.Linear):
    def linear_op(self, x, weight, bias):
        return F.linear(x, weight, bias)


class OutputQuantized(QuantizedModule):
    """The float module's own forward, then an :class:`ActivationQuantizer` on its output."""

    covers_children = True

    def _init_quantization(self, config: QuantConfig) -> None:
        self.output_quantizer = activation_quantizer(config)

    def forward(self, *args, **kwargs):
        return self.output_quantizer(super().forward(*args, **kwargs))


class QGroupNorm(OutputQuantized, nn.GroupNorm):
    """GroupNorm (float statistics and affine) with a quantized output."""

    float_internals = NORM_INTERNALS


class QLayerNorm(OutputQuantized, nn.LayerNorm):
    """LayerNorm (float statistics and affine) with a quantized output."""

    float_internals = NORM_INTERNALS


class QPReLU(OutputQuantized, nn.PReLU):
    """PReLU (float slope) with a quantized output."""

    float_internals = "PReLU slope: float (a single-slope PReLU exports as LeakyRelu)"


class QReLU(OutputQuantized, nn.ReLU):
    """ReLU with a quantized output."""


class QLeakyReLU(OutputQuantized, nn.LeakyReLU):
    """LeakyReLU with a quantized output."""


class QGELU(OutputQuantized, nn.GELU):
    """GELU with a quantized output."""


class QGLU(OutputQuantized, nn.GLU):
    """GLU with a quantized output."""


class QSigmoid(OutputQuantized, nn.Sigmoid):
    """Sigmoid with a quantized output."""


class QTanh(OutputQuantized, nn.Tanh):
    """Tanh with a quantized output."""


class QSoftmax(OutputQuantized, nn.Softmax):
    """Softmax with a quantized output."""


class Add(nn.Module):
    """Float ``a + b`` as a module, so that :func:`prepare` can quantize its output (cf. ``FloatFunctional``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Mul(nn.Module):
    """Float ``a * b`` as a module (masks, gates)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class Concat(nn.Module):
    """Float ``cat(tensors, dim)`` as a module: tensors on different grids need one common grid."""

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, self.dim)


class QAdd(OutputQuantized, Add):
    """``Q(a + b)``: residual and skip connections."""


class QMul(OutputQuantized, Mul):
    """``Q(a * b)``: masks and gates."""


class QConcat(OutputQuantized, Concat):
    """``Q(cat(tensors, dim))``."""


for _float_type, _wrapper in [
    (nn.Conv1d, QConv1d), (nn.Conv2d, QConv2d), (nn.ConvTranspose1d, QConvTranspose1d),
    (nn.ConvTranspose2d, QConvTranspose2d), (nn.Linear, QLinear), (nn.GroupNorm, QGroupNorm),
    (nn.LayerNorm, QLayerNorm), (nn.PReLU, QPReLU), (nn.ReLU, QReLU), (nn.LeakyReLU, QLeakyReLU), (nn.GELU, QGELU), (nn.GLU, QGLU),
    (nn.Sigmoid, QSigmoid), (nn.Tanh, QTanh), (nn.Softmax, QSoftmax), (Add, QAdd), (Mul, QMul), (Concat, QConcat),
]:
    register(_float_type, _wrapper)
