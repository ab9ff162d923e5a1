"""Quantizer state: what counts as a quantizer, whether a model is quantized, and resetting quantizers.

The one answer to these questions for the core, the toolkit adapters and the export package:

* :data:`LEARNED_QUANTIZERS` -- the quantizers of a model in QAT (their ranges learn);
  :data:`FROZEN_QUANTIZERS` -- what :func:`~fqss_plugin.freeze` turns them into;
  :data:`QUANTIZER_TYPES` -- both.
* :data:`STATEFUL_TYPES` -- the modules with an ``initialized`` flag in ``state_dict``: the learned
  quantizers and the :class:`~fqss_plugin.quant.signal_io.InputSplitter` (whose residual kernels are
  derived from the layer's weight on the first forward pass).
* :func:`is_quantized` -- holds any quantizer (learned or frozen).
* :func:`reset_quantizers` -- every stateful module back to its never-seen-data state (each one's
  ``reset_``): used after float weights are loaded into a quantized model, so that weight steps
  re-initialise from those weights and activation ranges calibrate again.
* :func:`uninitialized` -- the stateful modules that have never seen data (e.g. a quantized model
  whose checkpoint held float weights only).
"""
from __future__ import annotations

from torch import nn

from .quantizers import ActivationQuantizer, FrozenActivationQuantizer, FrozenWeightQuantizer, WeightQuantizer
from .signal_io import InputSplitter

LEARNED_QUANTIZERS = (ActivationQuantizer, WeightQuantizer)
FROZEN_QUANTIZERS = (FrozenActivationQuantizer, FrozenWeightQuantizer)
QUANTIZER_TYPES = LEARNED_QUANTIZERS + FROZEN_QUANTIZERS
STATEFUL_TYPES = LEARNED_QUANTIZERS + (InputSplitter,)


def is_weight_quantizer(module: nn.Module) -> bool:
    return isinstance(module, (WeightQuantizer, FrozenWeightQuantizer))


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds any quantizer (learned or frozen)."""
    return any(isinstance(m, QUANTIZER_TYPES) for m in model.modules())


def reset_quantizers(model: nn.Module) -> int:
    """Put every quantizer (and input splitter) of ``model`` back in its never-seen-data state; return how many."""
    stateful = [m for m in model.modules() if isinstance(m, STATEFUL_TYPES)]
    for module in stateful:
        module.reset_()
    return len(stateful)


def uninitialized(model: nn.Module) -> list[str]:
    """Names of the quantizers (and input splitters) of ``model`` that have never seen data."""
    return [name for name, m in model.named_modules() if isinstance(m, STATEFUL_TYPES) and not bool(m.initialized)]
