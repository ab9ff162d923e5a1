"""Fake-quantization with learnable step sizes (LSQ / LSQ+).

Both forward passes are bit-identical to the kernels a frozen model and the ONNX export use
(``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``), so a
trained model and its frozen copy give the same output. The backward passes are ours.

Notation: step size ``s > 0``, integer zero point ``z``, integer range ``[q_min, q_max]``,
``u = x / s`` and ``r = round(u)`` (round half to even, as the kernels do)::

    q = clamp(r + z, q_min, q_max)          y = (q - z) * s

Gradients (straight-through estimator for ``round``, LSQ+ for the range)::

    dy/dx = 1 inside the range, 0 where clipped
    dy/ds = r - u inside,  (q_min - z) below,  (q_max - z) above
    dy/dz = 0 inside,      -s where clipped   (z is a float parameter rounded in the forward pass)

The range gradients are multiplied by ``grad_factor`` (LSQ uses 1 / sqrt(numel * q_max)).
"""
from __future__ import annotations

import torch

MIN_SCALE = 1e-8
"""Smallest step size; a silent (all-zero) tensor calibrates to it instead of dividing by zero."""
MAX_SCALE = 1e8
"""Largest step size; keeps a diverged range finite."""


def _symmetric_gradients(grad: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, q_min: int,
                         q_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dw, dL/ds) element-wise for zero point 0, before reducing dL/ds to the step's shape."""
    u = w * (1.0 / scale)
    r = torch.round(u)
    below, above = r < q_min, r > q_max
    inside = ~(below | above)
    ds = torch.where(inside, r - u, torch.where(below, float(q_min), float(q_max)))
    return grad * inside, grad * ds


class _PerTensorFakeQuantize(torch.autograd.Function):
    """Per-tensor LSQ+ fake-quantization.

    The forward pass is written with plain tensor ops in the exact order of the
    ``torch.fake_quantize_per_tensor_affine`` kernel (``round(x * (1/s)) + z``, clamp,
    ``(q - z) * s`` in float32), so it is bit-identical to it (tested) while being several
    times faster on CPU. It keeps what the backward pass needs as float tensors (arithmetic on
    float masks is much faster than on bool ones): ``outside`` (1 where clipped, from the integer
    codes: ``min(|q - clamp(q)|, 1)``) and ``d = y - x·(1 - outside)``, so that ``∂y/∂s = d/s``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, q_min, q_max, grad_factor):
        z = torch.clamp(torch.round(zero_point), q_min, q_max)
        inv_scale = 1.0 / scale
        q = (x * inv_scale).round_().add_(z)
        clamped = q.clamp(q_min, q_max)
        outside = q.sub_(clamped).abs_().clamp_(max=1.0)
        y = clamped.sub_(z).mul_(scale)
        learn_range = grad_factor != 0.0 and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        d = (y - x).addcmul_(x, outside) if learn_range else None
        ctx.save_for_backward(outside, d, scale, inv_scale)
        ctx.grad_factor = grad_factor
        ctx.zero_point_shape = zero_point.shape
        return y

    @staticmethod
    def backward(ctx, grad):
        outside, d, scale, inv_scale = ctx.saved_tensors
        grad_x = torch.addcmul(grad, grad, outside, value=-1.0)
        if d is None:               # range not learned (calibrating, or fixed): zero gradient
            return grad_x, torch.zeros_like(scale), scale.new_zeros(ctx.zero_point_shape), None, None, None
        flat_grad = grad.reshape(-1)
        grad_s = (torch.dot(flat_grad, d.reshape(-1)) * inv_scale * ctx.grad_factor).reshape(scale.shape)
        grad_z = (-scale * torch.dot(flat_grad, outside.reshape(-1)) * ctx.grad_factor).reshape(ctx.zero_point_shape)
        return grad_x, grad_s, grad_z, None, None, None


class _PerChannelFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, axis, q_min, q_max, grad_factor):
        ctx.save_for_backward(w, scale)
        ctx.params = (axis, q_min, q_max, grad_factor)
        zeros = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        return torch.fake_quantize_per_channel_affine(w, scale.float(), zeros, axis, q_min, q_max)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        axis, q_min, q_max, grad_factor = ctx.params
        shape = [1] * w.dim()
        shape[axis] = -1
        s = scale.reshape(shape)
        grad_w, grad_s = _symmetric_gradients(grad, w, s, q_min, q_max)
        other_dims = [d for d in range(w.dim()) if d != axis]
        grad_s = grad_s.sum(dim=other_dims) if other_dims else grad_s
        return grad_w, grad_s * grad_factor, None, None, None, None


def fake_quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             q_min: int, q_max: int, grad_factor: float = 1.0) -> torch.Tensor:
    """Affine fake-quantization of ``x`` with a scalar learnable ``scale`` and float ``zero_point``."""
    return _PerTensorFakeQuantize.apply(x, scale, zero_point, q_min, q_max, grad_factor)


def fake_quantize_per_channel(w: torch.Tensor, scale: torch.Tensor, axis: int,
                              q_min: int, q_max: int, grad_factor: float = 1.0) -> torch.Tensor:
    """Symmetric (zero point 0) per-channel fake-quantization of ``w`` along ``axis``."""
    return _PerChannelFakeQuantize.apply(w, scale, axis, q_min, q_max, grad_factor)


def lsq_grad_factor(numel: int, q_max: int) -> float:
    """LSQ's step-size gradient scale 1 / sqrt(numel * q_max), keeping range updates O(1)."""
    return 1.0 / (max(numel, 1) * q_max) ** 0.5
