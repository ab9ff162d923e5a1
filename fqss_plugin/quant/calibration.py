"""Calibration is counted in optimizer steps and kept identical across DDP ranks.

Call :func:`calibration_step` once after every ``optimizer.step()`` (or let
:func:`attach_calibration` do it with an optimizer hook). While an activation quantizer is
calibrating, each step (1) averages the step's range over all DDP ranks, so that every rank
quantizes with the same range, and (2) counts the step. After ``calib_steps`` steps the range is
the starting point of learning. The counters are buffers: a resumed run continues where
it stopped and never calibrates again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .quantizers import ActivationQuantizer


def calibrating_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Activation quantizers of ``model`` still in calibration, in ``named_modules`` order."""
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.calibrating]


def is_calibrating(model: nn.Module) -> bool:
    return bool(calibrating_quantizers(model))


@torch.no_grad()
def calibration_step(model: nn.Module) -> int:
    """End one optimizer step of calibration; return how many quantizers are still calibrating.

    Every calibrating quantizer that saw data in this step (on any DDP rank) commits the range
    averaged over the ranks that saw data, and counts the step; so all ranks end every step,
    and calibration, with identical ranges and counters.
    """
    quantizers = calibrating_quantizers(model)
    if quantizers:
        stats = torch.stack([torch.stack([*q.calibrated_range(), q.has_pending.float()]) * q.has_pending.float()
                             for q in quantizers])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        for quantizer, (low, high, seen) in zip(quantizers, stats):
            if seen > 0:
                quantizer.end_calibration_step(low / seen, high / seen)
    return sum(q.calibrating for q in quantizers)      # a finished quantizer never calibrates again


def attach_calibration(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Run :func:`calibration_step` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: calibration_step(model))
