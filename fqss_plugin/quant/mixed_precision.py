"""Mixed-precision weights under a size budget: which layers can take fewer weight bits.

:func:`allocate_weight_bits` measures, for every weighted layer ``l`` and candidate width ``b``, the score
lost when only that layer's weights are re-quantized to ``b`` bits (steps re-initialised from the weights,
no training), ``Δ(l, b)``. It then starts from the widest candidate everywhere and, while the average
weight width (weighted by parameter count) exceeds ``budget_bits``, lowers by one candidate step the
layer with the least measured loss per bit-parameter saved,

    argmin_l  (Δ(l, b_next) - Δ(l, b_l)) / (n_l · (b_l - b_next)).

Greedy rather than an ILP: with a handful of widths per layer this knapsack is small, the greedy order
is optimal when each layer's loss grows convexly as its width shrinks (as quantization noise, 4x per
bit removed, does), and it needs no solver. The one-at-a-time losses ignore interactions between
layers; QAT with the resulting ``QuantConfig(layer_weight_bits=...)`` then trains the model under them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .layers import QuantizedLayer


def weighted_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The quantized conv/linear layers of ``model`` by name (the layers a width applies to)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


@contextmanager
def weight_bits(layer: QuantizedLayer, bits: int) -> Iterator[None]:
    """Inside the block, ``layer``'s weights are quantized to ``bits`` (steps re-initialised from the weights)."""
    quantizer = layer.weight_quantizer
    saved_bits, saved_steps = quantizer.bits, quantizer.log_scale.detach().clone()
    try:
        quantizer.set_bits(bits)
        quantizer.init_from(layer.weight)
        yield
    finally:
        quantizer.set_bits(saved_bits)
        with torch.no_grad():
            quantizer.log_scale.copy_(saved_steps)


def allocate_weight_bits(model: nn.Module, score: Callable[[nn.Module], float], budget_bits: float,
                         candidates: Sequence[int] = (8, 6, 4)) -> tuple[dict[str, int], dict]:
    """``({layer name: bits}, report)`` meeting ``budget_bits`` on average (see the module docstring).

    ``score(model)`` is higher-is-better (e.g. the mean SI-SDR on a few validation mixtures) and must not
    train the model. ``report`` holds the measured losses and the average width reached.
    """
    candidates = sorted(set(candidates), reverse=True)
    layers = weighted_layers(model)
    if not layers:
        raise ValueError("allocate_weight_bits: the model has no quantized weighted layer (prepare it first)")
    sizes = {name: layer.weight.numel() for name, layer in layers.items()}
    total = sum(sizes.values())
    if not candidates[-1] <= budget_bits:
        raise ValueError(f"allocate_weight_bits: a budget of {budget_bits} bits is below the narrowest candidate "
                         f"{candidates[-1]}")
    with torch.no_grad():
        reference = score(model)
        loss = {name: {candidates[0]: 0.0} for name in layers}
        for name, layer in layers.items():
            for bits in candidates[1:]:
                with weight_bits(layer, bits):
                    loss[name][bits] = reference - score(model)
    chosen = {name: candidates[0] for name in layers}

    def average() -> float:
        return sum(chosen[n] * sizes[n] for n in layers) / total

    while average() > budget_bits:
        options = []
        for name in layers:
            index = candidates.index(chosen[name])
            if index + 1 < len(candidates):
                narrower = candidates[index + 1]
                saved = sizes[name] * (chosen[name] - narrower)
                options.append(((loss[name][narrower] - loss[name][chosen[name]]) / saved, name, narrower))
        if not options:
            break
        _, name, narrower = min(options)
        chosen[name] = narrower
    return chosen, {"reference_score": reference, "loss": loss, "average_bits": average(), "parameters": sizes}
