"""Calibration is counted in optimizer steps and kept identical across DDP ranks.

Call :func:`calibration_step` once after every ``optimizer.step()`` (or let
:func:`attach_calibration` do it with an optimizer hook). While an activation quantizer is
calibrating, each step (1) averages its running min/max over all DDP ranks, so that every rank
quantizes with the same range, and (2) counts the step. After ``calib_steps`` steps the range is
fixed as the starting point of learning. The counters are buffers: a resumed run continues where
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
def sync_ranges(quantizers: list[ActivationQuantizer]) -> None:
    """Average the running ranges of ``quantizers`` over the ranks of the default process group."""
    if not quantizers or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    stats = torch.stack([torch.stack([q.running_min, q.running_max, q.initialized.float()]) for q in quantizers])
    dist.all_reduce(stats)
    for quantizer, (low, high, seen) in zip(quantizers, stats):
        if seen > 0:
            # ranks that have not seen data yet contribute zeros; average over those that have
            quantizer.running_min.copy_(low / seen)
            quantizer.running_max.copy_(high / seen)
            quantizer.initialized.fill_(True)
            quantizer.set_range(quantizer.running_min, quantizer.running_max)


@torch.no_grad()
def calibration_step(model: nn.Module) -> int:
    """Count one optimizer step for every calibrating quantizer; return how many are still calibrating."""
    quantizers = calibrating_quantizers(model)
    sync_ranges(quantizers)
    for quantizer in quantizers:
        if bool(quantizer.initialized):
            quantizer.steps_observed += 1
    return len(calibrating_quantizers(model))


def attach_calibration(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Run :func:`calibration_step` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: calibration_step(model))
