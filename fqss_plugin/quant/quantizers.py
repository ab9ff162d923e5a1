"""Quantizers: the modules that put a tensor on an integer grid.

* :class:`ActivationQuantizer` -- per tensor, asymmetric, unsigned ``[0, 2^b - 1]``, learnable
  step and offset (LSQ+). Its range is first *calibrated* from data for a number of optimizer
  steps, then learned.
* :class:`WeightQuantizer` -- per output channel, symmetric, signed ``[-2^(b-1), 2^(b-1) - 1]``
  (``-128..127`` at 8 bits, the range ONNX accepts), step initialised per channel at the clipping that
  minimises the weights' quantization MSE (or at ``abs-max / (2^(b-1) - 1)``).
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

import math
import warnings
from typing import Literal

import torch
from torch import nn

from .config import QuantConfig
from .functional import (MAX_SCALE, MIN_SCALE, fake_quantize_per_channel, fake_quantize_per_tensor,
                         lsq_grad_factor)

CalibrationMethod = Literal["ema", "mse"]
LOG_MIN_SCALE, LOG_MAX_SCALE = math.log(MIN_SCALE), math.log(MAX_SCALE)


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric fake-quantizer with a calibrated, then learned, range.

    Range ``[-z s, (2^b - 1 - z) s]`` with step ``s = exp(log_scale)`` and integer zero point
    ``z = round(zero_point)``; it always contains 0.

    Life cycle:
      1. *Calibrating* (``steps_observed < calib_steps``): in training mode every forward pass
         widens this step's range ``[pending_min, pending_max]`` (the union over the step's calls,
         e.g. a decoder run once per source); the quantization range is the EMA over completed
         steps, ``m·running + (1-m)·pending`` (just ``pending`` before the first step ends).
         With ``method="mse"`` each batch contributes its MSE-optimal clipping range instead of
         its min/max. :func:`~fqss_plugin.quant.calibration.calibration_step`, called once per
         optimizer step, averages the range over DDP ranks, commits it to ``running_*`` and counts
         the step.
      2. *Learning*: the step and zero point are trained by back-propagation (LSQ+).
    A quantizer that has never seen data (``initialized`` False) takes its range from its first
    batch even in eval mode, so that an uncalibrated model still runs.
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
        for name in ("running_min", "running_max", "pending_min", "pending_max"):
            self.register_buffer(name, torch.zeros(()))
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps_observed", torch.zeros((), dtype=torch.long))
        self.register_buffer("calib_steps", torch.tensor(calib_steps, dtype=torch.long))
        self._uncommitted = 0          # training batches observed since the last committed step (not state)

    # -- state ---------------------------------------------------------------------------
    @torch.no_grad()
    def reset_(self) -> None:
        """Back to the never-seen-data state: the range calibrates again from the next batches."""
        for name in ("log_scale", "zero_point", "running_min", "running_max", "pending_min", "pending_max",
                     "steps_observed"):
            getattr(self, name).zero_()
        self.has_pending.fill_(False)
        self.initialized.fill_(False)
        self._uncommitted = 0

    @property
    def calibrating(self) -> bool:
        return bool(self.steps_observed < self.calib_steps)

    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale.clamp(LOG_MIN_SCALE, LOG_MAX_SCALE))

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
        self.initialized.fill_(True)

    def calibrated_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range calibration currently stands at: EMA of the completed steps and this one."""
        if int(self.steps_observed) == 0:
            return self.pending_min, self.pending_max
        m = self.momentum
        return (m * self.running_min + (1 - m) * self.pending_min,
                m * self.running_max + (1 - m) * self.pending_max)

    _warned_autocast = False           # one warning per process

    UNCOMMITTED_WARNING = 500
    """Batches a calibrating quantizer observes without any optimizer step committing them before it warns (a
    training loop that never calls :func:`~fqss_plugin.quant.calibration.calibration_step`)."""

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch into this step's range and move the quantization range accordingly."""
        if self.training:
            self._uncommitted += 1
            if self._uncommitted == self.UNCOMMITTED_WARNING and int(self.steps_observed) == 0:
                warnings.warn(f"an ActivationQuantizer has observed {self._uncommitted} training batches and no "
                              "optimizer step has ended its calibration: call fqss_plugin.calibration_step(model) "
                              "after each optimizer step (or attach_calibration(optimizer, model)); a SpeechBrain "
                              "Brain needs fqss_plugin.speechbrain.fqss_brain", stacklevel=2)
        low, high = self._batch_range(x.detach().float())
        if bool(self.has_pending):
            low, high = torch.minimum(low, self.pending_min), torch.maximum(high, self.pending_max)
        self.pending_min.copy_(low)
        self.pending_max.copy_(high)
        self.has_pending.fill_(True)
        self.set_range(*self.calibrated_range())

    @torch.no_grad()
    def end_calibration_step(self, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> None:
        """Commit this step's range (or the given, e.g. rank-averaged, one) and count the step."""
        if low is None or high is None:
            low, high = self.calibrated_range()
        for buffer in (self.running_min, self.pending_min):
            buffer.copy_(low)
        for buffer in (self.running_max, self.pending_max):
            buffer.copy_(high)
        self.has_pending.fill_(False)
        self._uncommitted = 0
        self.steps_observed += 1
        self.set_range(low, high)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = torch.clamp(x.min(), max=0.0) if x.numel() else torch.zeros((), device=x.device)
        high = torch.clamp(x.max(), min=0.0) if x.numel() else torch.zeros((), device=x.device)
        if self.method == "mse":
            low, high = _mse_optimal_range(x, low, high, self.q_max)
        return low, high

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not ActivationQuantizer._warned_autocast and torch.is_autocast_enabled(x.device.type):
            ActivationQuantizer._warned_autocast = True
            warnings.warn("fake quantization under fp16/bf16 autocast: the quantizers put rounded values on their "
                          "grids (a QAT run drifts away from the fp32 one); train in fp32", stacklevel=2)
        if not bool(self.initialized) or (self.training and self.calibrating):
            self.observe(x)
        scale, zero_point = self.scale(), self.zero_point
        if self.calibrating:
            # The range follows the data (observe() rewrites it in place): use a snapshot. Adding
            # 0 x parameter keeps the parameters in the graph with a zero gradient, so DDP sees every
            # parameter used and needs no find_unused_parameters.
            scale = scale.detach() + 0.0 * self.log_scale
            zero_point = zero_point.detach() + 0.0 * self.zero_point
        grad_factor = 0.0 if self.calibrating else lsq_grad_factor(x.numel(), self.q_max)
        return fake_quantize_per_tensor(x, scale, zero_point, 0, self.q_max, grad_factor)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}, calib_steps={int(self.calib_steps)}"


def evenly_spaced(numel: int, count: int, device=None) -> torch.Tensor:
    """``count`` indices ``⌊i·(numel - 1) / (count - 1)⌋`` from ``0`` to ``numel - 1``, in exact integer arithmetic
    (a float32 ``linspace`` rounds past the last index once ``numel`` exceeds 2^24)."""
    return torch.arange(count, device=device, dtype=torch.int64) * (numel - 1) // max(count - 1, 1)


@torch.no_grad()
def _mse_optimal_range(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, q_max: int,
                       candidates: int = 32, max_samples: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range minimising the quantization MSE on ``x`` (at most ``max_samples`` evenly spaced values).

    Search over ``candidates`` log-spaced factors ``f ∈ [0.01, 1]``: first both ends together
    (``f·[low, high]``), then the upper and the lower end alone; each search scores all
    candidates in one batched pass.
    """
    flat = x.reshape(-1)
    if flat.numel() > max_samples:
        flat = flat[evenly_spaced(flat.numel(), max_samples, x.device)]
    factors = torch.logspace(-2, 0, candidates, device=x.device, dtype=flat.dtype)

    def best(lows: torch.Tensor, highs: torch.Tensor) -> int:
        scale = torch.clamp((highs - lows) / q_max, min=MIN_SCALE)[:, None]
        zero_point = torch.clamp(torch.round(-lows[:, None] / scale), 0, q_max)
        codes = torch.clamp(torch.round(flat[None] / scale) + zero_point, 0, q_max)
        return int(((codes - zero_point) * scale - flat[None]).pow(2).mean(1).argmin())

    shrink = factors[best(low * factors, high * factors)]
    low, high = low * shrink, high * shrink
    high = high * factors[best(low.expand(candidates), high * factors)]
    low = low * factors[best(low * factors, high.expand(candidates))]
    return low, high


WeightInit = Literal["mse", "max"]


@torch.no_grad()
def _mse_optimal_steps(channels: torch.Tensor, step: torch.Tensor, q_min: int, q_max: int) -> torch.Tensor:
    """Per row of ``channels`` ``[C, N]``, the step ``f · step`` (``f`` in 0.10, 0.12, ..., 1) whose codes
    ``clamp(round(w / s), q_min, q_max)`` reconstruct the row with the least squared error."""
    best_step, best_error = step.clone(), torch.full_like(step, float("inf"))
    for factor in torch.linspace(0.1, 1.0, 46, dtype=step.dtype).flip(0):       # from 1 down: ties keep the wider
        candidate = torch.clamp(step * factor, min=MIN_SCALE)[:, None]
        error = (torch.clamp(torch.round(channels / candidate), q_min, q_max) * candidate - channels).pow(2).sum(1)
        better = error < best_error
        best_step, best_error = torch.where(better, candidate[:, 0], best_step), torch.where(better, error, best_error)
    return best_step


class WeightQuantizer(nn.Module):
    """Per-channel symmetric fake-quantizer for weights, with a learnable step per channel.

    ``w_q = s_c * clamp(round(w / s_c), -2^(b-1), 2^(b-1) - 1)`` along ``axis`` (0 for convs and
    linear layers, 1 for transposed convs, whose weight is ``[C_in, C_out, k...]``).
    The step is initialised on the first forward pass, i.e. after pretrained float weights have been
    loaded (:meth:`init_from`): ``init="max"`` puts the largest weight of each channel on the last code,
    ``s_c = max_c |w| / (2^(b-1) - 1)``; ``init="mse"`` (the default) clips where the channel's
    quantization error is least, ``s_c = f_c · max_c |w| / (2^(b-1) - 1)`` with
    ``f_c = argmin_f Σ_i (Q(w_ci; f) - w_ci)²`` over ``f ∈ {0.10, 0.12, ..., 1}``. The gap between the two
    grows as the codes narrow (weights are bell-shaped: a few large ones waste most of a coarse grid).
    """

    def __init__(self, num_channels: int, bits: int = 8, axis: int = 0, learnable: bool = True,
                 init: WeightInit = "mse") -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"WeightQuantizer: bits must be in 2..16, got {bits}")
        if init not in ("mse", "max"):
            raise ValueError(f"WeightQuantizer: init must be 'mse' or 'max', got {init!r}")
        self.axis = axis
        self.set_bits(bits)
        self.learnable = learnable
        self.init = init
        self.log_scale = nn.Parameter(torch.zeros(num_channels), requires_grad=learnable)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def set_bits(self, bits: int) -> None:
        """The signed code range ``[-2^(b-1), 2^(b-1) - 1]`` of ``bits`` (the steps are not changed)."""
        self.bits, self.q_min, self.q_max = bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale.clamp(LOG_MIN_SCALE, LOG_MAX_SCALE))

    @torch.no_grad()
    def reset_(self) -> None:
        """Back to the never-seen-data state: the steps re-initialise from the weights of the next forward pass."""
        self.log_scale.zero_()
        self.initialized.fill_(False)

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Steps from the weights ``w`` (see the class docstring)."""
        channels = w.detach().movedim(self.axis, 0).reshape(w.shape[self.axis], -1) if w.dim() else w.reshape(1, 1)
        if channels.shape[0] != self.log_scale.numel():
            raise ValueError(f"WeightQuantizer: weight has {channels.shape[0]} channels on axis {self.axis}, "
                             f"expected {self.log_scale.numel()}")
        step = torch.clamp(channels.abs().amax(dim=1) / self.q_max, min=MIN_SCALE)
        if self.init == "mse":
            step = _mse_optimal_steps(channels, step, self.q_min, self.q_max)
        self.log_scale.copy_(torch.log(step))
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(w)
        scale = self.scale() if self.learnable else self.scale().detach()
        grad_factor = lsq_grad_factor(w.numel() // max(scale.numel(), 1), self.q_max)
        return fake_quantize_per_channel(w, scale, self.axis, self.q_min, self.q_max, grad_factor)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}, channels={self.log_scale.numel()}, init={self.init}"


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
        q_min, q_max = self.q_min, self.q_max
        if self.bits < 8:
            # Codes narrower than int8 (7-bit: -64..63) are stored in int8: clamp w onto the narrow range,
            # then the int8 fake-quant, the only signed range ONNX export accepts. Same codes, same values.
            shape = [1] * w.dim()
            shape[self.axis] = -1
            step = self.scale.reshape(shape)
            w = torch.minimum(torch.maximum(w, q_min * step), q_max * step)
            q_min, q_max = -128, 127
        return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, self.axis, q_min, q_max)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}, channels={self.scale.numel()}"




def activation_quantizer(config: QuantConfig) -> ActivationQuantizer:
    """An :class:`ActivationQuantizer` with the settings of ``config``."""
    return ActivationQuantizer(config.act_bits, config.calib_steps, config.calib_method, config.ema_momentum,
                               config.learn_ranges)


def weight_quantizer(num_channels: int, config: QuantConfig, axis: int = 0) -> WeightQuantizer:
    """A :class:`WeightQuantizer` of ``num_channels`` steps along ``axis`` with the settings of ``config``."""
    return WeightQuantizer(num_channels, config.weight_bits, axis=axis, learnable=config.learn_ranges,
                           init=config.weight_init)
