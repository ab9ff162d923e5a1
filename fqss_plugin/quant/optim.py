"""Optimizer parameter groups: the quantizers' ranges learn at their own rate.

Steps are learned as ``log s`` and Adam moves every parameter by about ``lr`` per update, whatever
the gradient's scale, so a step changes by a *relative* ``lr`` per update. At a fine-tuning rate
for the weights (``1e-4``) a range could move no more than 0.01 % per step: after a QAT run of a
thousand steps it would still sit at its min/max calibration, far from the clipping that minimises
the error. ``quantizer_lr`` (``QuantConfig.quantizer_lr``, ``1e-2`` by default: a range may move
1 % per step) lets the ranges learn within a QAT run while the weights fine-tune gently.
"""
from __future__ import annotations

import torch
from torch import nn

from .state import LEARNED_QUANTIZERS


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable steps and zero points of every quantizer of ``model`` (in ``parameters()`` order)."""
    owned = {id(p) for m in model.modules() if isinstance(m, LEARNED_QUANTIZERS)
             for p in m.parameters(recurse=False)}
    return [p for p in model.parameters() if id(p) in owned]


def parameter_groups(model: nn.Module, quantizer_lr: float | None) -> list[dict]:
    """``[{"params": model weights}, {"params": quantizer ranges, "lr": quantizer_lr, "weight_decay": 0}]``.

    Pass the result to any ``torch.optim`` optimizer in place of ``model.parameters()``; the first
    group takes the optimizer's own ``lr`` and weight decay. With ``quantizer_lr=None``, or a model
    without quantizers, there is one group (the ranges, if any, take the optimizer's ``lr``).
    Quantizer ranges never get weight decay: it would pull the steps towards 1.
    """
    if quantizer_lr is not None and not quantizer_lr > 0:
        raise ValueError(f"parameter_groups: quantizer_lr must be positive or None, got {quantizer_lr!r}")
    ranges = quantizer_parameters(model)
    owned = {id(p) for p in ranges}
    weights = [p for p in model.parameters() if id(p) not in owned]
    if not ranges or quantizer_lr is None:
        return [{"params": weights + ranges}]
    return [{"params": weights}, {"params": ranges, "lr": quantizer_lr, "weight_decay": 0.0}]


def regroup_quantizer_parameters(optimizer: torch.optim.Optimizer, model: nn.Module,
                                 quantizer_lr: float | None) -> bool:
    """Move the quantizers' ranges of ``model`` out of ``optimizer``'s groups into a group of their own
    (``lr=quantizer_lr``, no weight decay), in place; for an optimizer built over ``model.parameters()``.

    A ``ReduceLROnPlateau`` built before keeps one ``min_lrs`` entry per group: give it one more
    (:func:`extend_plateau_scheduler`). Returns whether a group was added (not when ``quantizer_lr`` is
    None, the model has no quantizer, or they already have their own group).
    """
    ranges = {id(p) for p in quantizer_parameters(model)}
    if quantizer_lr is None or not ranges:
        return False
    if any(group["params"] and all(id(p) in ranges for p in group["params"]) for group in optimizer.param_groups):
        return False
    moved = []
    for group in optimizer.param_groups:
        moved += [p for p in group["params"] if id(p) in ranges]
        group["params"] = [p for p in group["params"] if id(p) not in ranges]
    optimizer.add_param_group({"params": moved, "lr": quantizer_lr, "weight_decay": 0.0})
    return True


def extend_plateau_scheduler(scheduler, optimizer: torch.optim.Optimizer) -> None:
    """Give a ``ReduceLROnPlateau`` built before :func:`regroup_quantizer_parameters` a ``min_lr`` for the new
    group (the first group's)."""
    min_lrs = getattr(scheduler, "min_lrs", None)
    if isinstance(min_lrs, list) and min_lrs and len(min_lrs) < len(optimizer.param_groups):
        min_lrs += [min_lrs[0]] * (len(optimizer.param_groups) - len(min_lrs))
