"""Quantizers: the modules that put a tensor on an integer grid.

* :class:`ActivationQuantizer` -- per tensor, asymmetric, unsigned ``[0, 2^b - 1]``, learnable
  step and offset (LSQ+). Its range is first *calibrated* from data for a number of optimizer
  steps, then learned.
* :class:`WeightQuantizer` -- per output channel, symmetric, signed ``[-2^(b-1), 2^(b-1) - 1]``
  (``-128..127`` at 8 bits, the range ONNX accepts), step initialised at ``abs-max / (2^(b-1) - 1)``.
* :class:`FrozenActivationQuantizer` / :class:`FrozenWeightQuantizer` -- what :func:`freeze`
  turns them into: plain ``torch.fake_quantize_*`` ops with buffers, ready for export.

Steps are learned as ``log s`` so that an Adam update changes them by a *relative* amount
(a raw step under Adam at lr 1e-3 was seen to drift to 4x its initial value in 20 steps).
The zero point is a float parameter rounded to an integer in every forward pass, so the value
0 is always exactly representable and the frozen model uses the very same integer.

All state (calibration statistics, step counters, whether a quantizer is initialised) lives in
buffers, hence in ``state_dict``: resuming from a checkpoint never re-calibrates.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .functional import (MIN_SCALE, fake_quantize_per_channel, fake_quantize_per_tensor,
                         lsq_grad_factor)

CalibrationMethod = Literal["ema", "mse"]


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric fake-quantizer with a calibrated, then learned, range.

    Range ``[-z s, (2^b - 1 - z) s]`` with step ``s = exp(log_scale)`` and integer zero point
    ``z = round(zero_point)``; it always contains 0.

    Life cycle:
      1. *Uninitialised*: the first forward pass (train or eval) sets the range from that batch.
      2. *Calibrating* (``steps_observed < calib_steps``): in training mode every forward pass
         updates the running min/max (EMA with ``momentum``, or the MSE-optimal clipping range
         with ``method="mse"``) and the range follows them. :func:`calibration_step` counts
         optimizer steps and averages the statistics over DDP ranks.
      3. *Learning*: the step and zero point are trained by back-propagation (LSQ+).
    """

    def __init__(self, bits: int = 8, calib_steps: int = 100, method: CalibrationMethod = "ema",
                 momentum: float = 0.9, learnable: bool = True) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"ActivationQuantizer: bits must be in 2..16, got {bits}")
        if method not in ("ema", "mse"):
            raise ValueError(f"ActivationQuantizer: method must be 'ema' or 'mse', got {method!r}")
        self.bits = bits
        self.q_max = 2 ** bits - 1
        self.method = method
        self.momentum = momentum
        self.learnable = learnable
        self.log_scale = nn.Parameter(torch.zeros(()), requires_grad=learnable)
        self.zero_point = nn.Parameter(torch.zeros(()), requires_grad=learnable)
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps_observed", torch.zeros((), dtype=torch.long))
        self.register_buffer("calib_steps", torch.tensor(calib_steps, dtype=torch.long))

    # -- state ---------------------------------------------------------------------------
    @property
    def calibrating(self) -> bool:
        return bool(self.steps_observed < self.calib_steps)

    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale).clamp(min=MIN_SCALE)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, integer zero point) exactly as used in the forward pass."""
        scale = self.scale().detach().reshape(1)
        zero_point = torch.clamp(torch.round(self.zero_point.detach()), 0, self.q_max)
        return scale, zero_point.reshape(1).to(torch.int32)

    @torch.no_grad()
    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Set step and zero point so that ``[low, high]`` (widened to contain 0) is covered."""
        low = torch.clamp(low, max=0.0)
        high = torch.clamp(high, min=0.0)
        scale = torch.clamp((high - low) / self.q_max, min=MIN_SCALE)
        self.log_scale.copy_(torch.log(scale))
        self.zero_point.copy_(torch.clamp(torch.round(-low / scale), 0, self.q_max))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch into the running range and move the quantization range to it."""
        low, high = self._batch_range(x.detach().float())
        if not bool(self.initialized):
            self.running_min.copy_(low)
            self.running_max.copy_(high)
            self.initialized.fill_(True)
        else:
            self.running_min.mul_(self.momentum).add_((1 - self.momentum) * low)
            self.running_max.mul_(self.momentum).add_((1 - self.momentum) * high)
        self.set_range(self.running_min, self.running_max)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = torch.clamp(x.min(), max=0.0) if x.numel() else torch.zeros((), device=x.device)
        high = torch.clamp(x.max(), min=0.0) if x.numel() else torch.zeros((), device=x.device)
        if self.method == "mse":
            low, high = _mse_optimal_range(x, low, high, self.q_max)
        return low, high

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized) or (self.training and self.calibrating):
            self.observe(x)
        scale = self.scale()
        zero_point = self.zero_point
        if self.calibrating or not self.learnable:
            scale, zero_point = scale.detach(), zero_point.detach()
        grad_factor = lsq_grad_factor(x.numel(), self.q_max)
        return fake_quantize_per_tensor(x, scale, zero_point, 0, self.q_max, grad_factor)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}, calib_steps={int(self.calib_steps)}"


@torch.no_grad()
def _mse_optimal_range(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, q_max: int,
                       candidates: int = 16, max_samples: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink ``[low, high]`` by the factor in [0.3, 1] that minimises the quantization MSE on ``x``."""
    flat = x.reshape(-1)
    if flat.numel() > max_samples:
        flat = flat[torch.linspace(0, flat.numel() - 1, max_samples, device=x.device).long()]
    best_err, best = None, (low, high)
    for factor in torch.linspace(0.3, 1.0, candidates).tolist():
        lo, hi = low * factor, high * factor
        scale = torch.clamp((hi - lo) / q_max, min=MIN_SCALE)
        zero_point = torch.clamp(torch.round(-lo / scale), 0, q_max).to(torch.int32)
        err = (torch.fake_quantize_per_tensor_affine(flat, scale.reshape(1), zero_point.reshape(1), 0, q_max)
               - flat).pow(2).mean()
        if best_err is None or err < best_err:
            best_err, best = err, (lo, hi)
    return best


class WeightQuantizer(nn.Module):
    """Per-channel symmetric fake-quantizer for weights, with a learnable step per channel.

    ``w_q = s_c * clamp(round(w / s_c), -2^(b-1), 2^(b-1) - 1)`` along ``axis`` (0 for convs and
    linear layers, 1 for transposed convs, whose weight is ``[C_in, C_out, k...]``).
    The step is initialised at ``max_c |w| / (2^(b-1) - 1)`` on the first forward pass, i.e.
    after pretrained float weights have been loaded.
    """

    def __init__(self, num_channels: int, bits: int = 8, axis: int = 0, learnable: bool = True) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"WeightQuantizer: bits must be in 2..16, got {bits}")
        self.bits = bits
        self.axis = axis
        self.q_min = -(2 ** (bits - 1))
        self.q_max = 2 ** (bits - 1) - 1
        self.learnable = learnable
        self.log_scale = nn.Parameter(torch.zeros(num_channels), requires_grad=learnable)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale).clamp(min=MIN_SCALE)

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        dims = [d for d in range(w.dim()) if d != self.axis]
        abs_max = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
        if abs_max.shape != self.log_scale.shape:
            raise ValueError(f"WeightQuantizer: weight has {abs_max.numel()} channels on axis {self.axis}, "
                             f"expected {self.log_scale.numel()}")
        self.log_scale.copy_(torch.log(torch.clamp(abs_max / self.q_max, min=MIN_SCALE)))
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(w)
        scale = self.scale() if self.learnable else self.scale().detach()
        grad_factor = lsq_grad_factor(w.numel() // max(scale.numel(), 1), self.q_max)
        return fake_quantize_per_channel(w, scale, self.axis, self.q_min, self.q_max, grad_factor)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}, channels={self.log_scale.numel()}"


class FrozenActivationQuantizer(nn.Module):
    """``torch.fake_quantize_per_tensor_affine`` with fixed buffers (exportable to ONNX Q/DQ)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.q_max = 2 ** bits - 1
        self.register_buffer("scale", scale.detach().clone().float().reshape(1))
        self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int32).reshape(1))

    @classmethod
    def from_quantizer(cls, quantizer: ActivationQuantizer) -> FrozenActivationQuantizer:
        scale, zero_point = quantizer.qparams()
        return cls(scale, zero_point, quantizer.bits)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, self.q_max)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={float(self.scale):.3g}, zero_point={int(self.zero_point)}"


class FrozenWeightQuantizer(nn.Module):
    """``torch.fake_quantize_per_channel_affine`` with fixed per-channel steps (zero point 0)."""

    def __init__(self, scale: torch.Tensor, axis: int, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.axis = axis
        self.q_min = -(2 ** (bits - 1))
        self.q_max = 2 ** (bits - 1) - 1
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int32))

    @classmethod
    def from_quantizer(cls, quantizer: WeightQuantizer) -> FrozenWeightQuantizer:
        return cls(quantizer.scale(), quantizer.axis, quantizer.bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, self.axis,
                                                     self.q_min, self.q_max)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}, channels={self.scale.numel()}"


QUANTIZER_TYPES = (ActivationQuantizer, WeightQuantizer, FrozenActivationQuantizer, FrozenWeightQuantizer)

