"""High-precision input and output signals from several 8-bit ones (the FQSS signal path).

With ``b`` bits, ``Δ = 2^-(b-1)`` (the step of a signed b-bit grid on [-1, 1)) and the residual
gain ``ρ = 1/(2^b - 1) = Δ/(2 - Δ)``:

* **Split** (:func:`split_signal`): a signal ``x ∈ [-(1-Δ), 1-Δ]`` becomes ``n`` signals on that grid,
  ``s_0 = Δ·⌊x/Δ + 1/2⌋`` and, for the residual ``r_i = x - Σ_{j<i} ρ^j s_j ∈ [-ρ^i Δ/2, ρ^i Δ/2)``,
  ``s_i = Δ·⌊r_i / (ρ^i Δ) + 1/2⌋``. Hence ``x ≈ Σ_i ρ^i s_i`` with error at most ``ρ^(n-1)·Δ/2``
  (1.5e-5 for two 8-bit signals): each residual is stretched by ``1/ρ`` to fill the grid.
  ``ρ`` is the largest gain for which a stretched residual ``[-(1-Δ/2), 1-Δ/2)`` never clips
  (the paper's ``Δ/2`` stretches the top half-step past the grid and loses a level of precision
  on those samples); rounding half up (not the published floor) leaves no constant offset.
* **Combine** (:func:`combine_signals`): ``y = Σ_i ρ^i y_i``.
* **Residual outputs** (:class:`ResidualSplit`): a tensor ``a`` already quantized once, ``y_0 = Q_0(a)``
  with step ``s``, gets further b-bit tensors ``y_i = Q_i((a - Σ_{j<i} ρ^j y_j) / ρ^i)`` on step ``s``
  with the mid zero point ``2^(b-1)``: the rounding error in ``[-s/2, s/2]`` stretched by ``1/ρ = 2^b - 1``
  spans exactly the ``2^b`` codes, so ``Σ_i ρ^i y_i`` has the precision of ``splits·b`` bits.

:class:`InputSplitter` normalises each example by its own peak ``θ`` (so batching and chunking
do not change the result), splits it and feeds every split to the first layer, whose input is
thereby widened ``n``-fold. Split ``i`` has its own kernel, initialised to ``ρ^i`` times the float
kernel so that the widened layer reproduces the float layer at step 0. :class:`OutputCombiner`
emits ``n`` b-bit outputs of the last layer and multiplies the recombined output back by ``θ``.
:class:`SplitActivationQuantizer` carries an activation *inside* the network, e.g. the decoder's
input (the mask product), on ``n`` b-bit tensors, and the layer consuming it runs once per tensor.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import QuantConfig
from .quantizers import weight_quantizer


def grid_step(bits: int) -> float:
    """Δ = 2^-(b-1): the step of a signed ``bits`` grid covering [-1, 1)."""
    return 2.0 ** -(bits - 1)


def residual_gain(bits: int) -> float:
    """ρ = 1/(2^b - 1): the weight of each further split relative to the previous one."""
    return 1.0 / (2 ** bits - 1)


def _signed_grid(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``Δ·clip(⌊x/Δ + 1/2⌋, -2^(b-1), 2^(b-1)-1)``; exact, since Δ is a power of two."""
    step = grid_step(bits)
    return torch.clamp(torch.floor(x / step + 0.5), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step


def split_signal(x: torch.Tensor, bits: int, splits: int) -> list[torch.Tensor]:
    """Split ``x`` (values in [-(1-Δ), 1-Δ]) into ``splits`` signals on the signed ``bits`` grid."""
    gain = residual_gain(bits)
    signals, residual = [], x
    for _ in range(splits):
        part = _signed_grid(residual, bits)
        signals.append(part)
        residual = (residual - part) / gain
    return signals


def combine_signals(signals: list[torch.Tensor], bits: int) -> torch.Tensor:
    """``Σ_i ρ^i y_i``, the inverse of :func:`split_signal`."""
    gain = residual_gain(bits)
    return sum(signal * gain ** i for i, signal in enumerate(signals))


class SignalScale:
    """The per-example peak ``θ`` shared by the input splitter and the output combiner.

    The splitter sets it for each forward pass; the combiner multiplies the output back by it.
    This works because the separators are positively homogeneous, ``f(x/θ)·θ = f(x)``.
    """

    def __init__(self) -> None:
        self.theta: torch.Tensor | None = None

    def normalize(self, x: torch.Tensor, peak: float) -> torch.Tensor:
        """Map each example's peak ``max |x_b|`` to ``peak`` and remember ``θ_b = max|x_b| / peak``."""
        dims = tuple(range(1, x.dim()))
        abs_max = x.detach().abs().amax(dim=dims) if dims else x.detach().abs()
        self.theta = torch.clamp(abs_max, min=1e-8) / peak
        return x / self._broadcast(self.theta, x)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        if self.theta is None:
            raise RuntimeError("OutputCombiner ran before InputSplitter: the decoder was called without the "
                               "encoder having seen this batch (the output cannot be de-normalised)")
        if y.shape[0] != self.theta.shape[0]:
            raise RuntimeError(f"OutputCombiner: decoder output batch size {y.shape[0]} differs from the encoder "
                               f"input batch size {self.theta.shape[0]}; the batch must stay on dim 0")
        return y * self._broadcast(self.theta, y)

    @staticmethod
    def _broadcast(theta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return theta.reshape((-1,) + (1,) * (like.dim() - 1))


class InputSplitter(nn.Module):
    """Feeds ``splits`` b-bit signals of the (normalised) input to the first layer.

    ``config`` gives the splits (``in_splits`` of ``act_bits``) and the residual kernels' weight quantizers (the
    layer's own config, hence its weight bits). The layer keeps its float ``weight`` (strict loading of float
    checkpoints); the kernels of the residual splits live in ``extra_weight`` (shape ``[splits-1, *weight.shape]``),
    each with its own per-channel weight quantizer, and are set to ``ρ^i · weight`` on the first
    forward pass (after pretrained weights are loaded). The layer computes
    ``layer(s_0; W) + Σ_i layer(s_i; W_i)`` with the bias added once.
    """

    float_internals = "per-example peak normalisation of the input: one float scalar per example"

    def __init__(self, weight: torch.Tensor, weight_axis: int, config: QuantConfig, scale: SignalScale | None) -> None:
        super().__init__()
        if config.in_splits < 2:
            raise ValueError(f"InputSplitter needs at least 2 splits, got {config.in_splits}")
        self.bits = config.act_bits
        self.splits = config.in_splits
        self.signal_scale = scale
        self.extra_weight = nn.Parameter(torch.zeros((self.splits - 1,) + tuple(weight.shape), dtype=weight.dtype))
        self.weight_quantizers = nn.ModuleList(weight_quantizer(weight.shape[weight_axis], config, weight_axis)
                                               for _ in range(self.splits - 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def reset_(self) -> None:
        """Back to the never-seen-data state: the residual kernels (and their quantizers) re-initialise
        from the layer's weight on the next forward pass."""
        self.initialized.fill_(False)
        for quantizer in self.weight_quantizers:
            quantizer.reset_()

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        gain = residual_gain(self.bits)
        for i in range(self.splits - 1):
            self.extra_weight[i].copy_(weight * gain ** (i + 1))
        self.initialized.fill_(True)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.signal_scale is not None:
            x = self.signal_scale.normalize(x, peak=1.0 - grid_step(self.bits))
        return split_signal(x, self.bits, self.splits)

    def forward(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(layer.weight)
        signals = self.split(x)
        out = layer.linear_op(signals[0], layer.weight_quantizer(layer.weight), layer.bias)
        for signal, weight, quantizer in zip(signals[1:], self.extra_weight, self.weight_quantizers):
            out = out + layer.linear_op(signal, quantizer(weight), None)
        return out

    def extra_repr(self) -> str:
        return f"splits={self.splits}, bits={self.bits}, normalize={self.signal_scale is not None}"


class ResidualSplit:
    """Mixin of :class:`OutputCombiner` and :class:`SplitActivationQuantizer` (``bits``, ``splits``): the
    residual b-bit parts of a tensor already quantized once."""

    bits: int
    splits: int

    def residual_quantizer(self, scale: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``(i, r) -> y_i``: fake-quantization on step ``scale`` with the mid zero point ``2^(b-1)``."""
        mid = torch.full((1,), 2 ** (self.bits - 1), dtype=torch.int32, device=scale.device)
        return lambda _, residual: torch.fake_quantize_per_tensor_affine(residual, scale, mid, 0, 2 ** self.bits - 1)

    def split_residuals(self, x: torch.Tensor, first: torch.Tensor,
                        scale: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``([y_0, ..., y_{splits-1}], Σ_i ρ^i y_i)`` with ``y_0 = first`` (step ``scale``) and
        ``y_i = Q((x - Σ_{j<i} ρ^j y_j) / ρ^i)``. The gradient reaches ``x`` through every part
        (straight-through inside the range)."""
        quantize, gain = self.residual_quantizer(scale), residual_gain(self.bits)
        parts, total = [first], first
        for i in range(1, self.splits):
            parts.append(quantize(i, (x - total) / gain ** i))
            total = total + parts[-1] * gain ** i
        return parts, total


class OutputCombiner(ResidualSplit, nn.Module):
    """Emits the last layer's output as ``splits`` b-bit tensors and recombines them.

    ``y_0 = Q_0(a)`` is the layer's ordinary output quantizer applied to its pre-quantization
    output ``a`` (the integer accumulator on an integer engine). Each further output carries the
    error left by the ones before it, stretched by ``1/ρ^i`` to fill the b-bit range:
    ``y_i = Q_i((a - Σ_{j<i} ρ^j y_j) / ρ^i)``, where ``Q_i`` has the step of ``Q_0`` and the
    mid-range zero point ``2^(b-1)``: a rounding error in ``[-s/2, s/2]`` stretched by
    ``1/ρ = 2^b - 1`` spans exactly the ``2^b`` codes. The result ``Σ_i ρ^i y_i`` has the precision of a
    ``splits·b``-bit output, is exact at initialisation and follows ``Q_0`` as its range is learned.

    Why not the published re-encoder path (``Q(Y - E(y_0))`` decoded again)? A decoder from N
    latent channels to a few samples has a large null space; ``Y - E(y_0)`` keeps all of it, so its
    8-bit quantization noise swamps the residual. The accumulator residual has no null space.
    """

    float_internals = "recombination of the 8-bit outputs and de-normalisation: float post-processing"

    def __init__(self, bits: int, splits: int, scale: SignalScale | None) -> None:
        super().__init__()
        self.bits = bits
        self.splits = splits
        self.signal_scale = scale

    def forward(self, pre_activation: torch.Tensor, output_quantizer: nn.Module) -> torch.Tensor:
        out = output_quantizer(pre_activation)
        if self.splits > 1:
            _, out = self.split_residuals(pre_activation, out, output_quantizer.qparams()[0])
        if self.signal_scale is not None:
            out = self.signal_scale.denormalize(out)
        return out

    def extra_repr(self) -> str:
        return f"splits={self.splits}, bits={self.bits}, denormalize={self.signal_scale is not None}"


class SplitActivationQuantizer(ResidualSplit, nn.Module):
    """An activation carried by ``splits`` b-bit tensors instead of one (more precision, same grid).

    ``y_0 = Q_0(x)`` is an ordinary learned :class:`ActivationQuantizer` (``first``: calibrated, then
    trained); the others are its residuals (:class:`ResidualSplit`, fixed, on ``Q_0``'s step). As the
    input quantizer of a layer it runs the layer's op once per part, ``Σ_i ρ^i op(y_i; W)`` with the bias
    added once, which is what an integer engine computes (one integer op per 8-bit tensor, the
    results summed in the accumulator domain); called on its own it returns ``Σ_i ρ^i y_i``.

    Where it pays: a linear decoder maps its input to the output samples, so the output of a
    separator cannot be more precise than the decoder's input, whatever the output combiner does.
    """

    def __init__(self, first: nn.Module, bits: int, splits: int) -> None:
        super().__init__()
        if splits < 2:
            raise ValueError(f"SplitActivationQuantizer needs at least 2 splits, got {splits}")
        self.first = first
        self.bits = bits
        self.splits = splits
        # in the state_dict, so that a checkpoint with another number of splits does not load silently
        self.register_buffer("n_splits", torch.tensor(splits))

    def split(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The parts ``[y_0, ...]`` and their sum ``Σ_i ρ^i y_i``."""
        return self.split_residuals(x, self.first(x), self.first.qparams()[0])

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.split(x)[0]

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first tensor's (step, zero point); the residual tensors share the step."""
        return self.first.qparams()

    def forward(self, x: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:
        parts, total = self.split(x)
        if layer is None:
            return total
        weight, gain = layer.weight_quantizer(layer.weight), residual_gain(self.bits)
        out = layer.linear_op(parts[0], weight, layer.bias)
        for i, part in enumerate(parts[1:], start=1):
            out = out + layer.linear_op(part, weight, None) * gain ** i
        return out

    def extra_repr(self) -> str:
        return f"splits={self.splits}, bits={self.bits}"
