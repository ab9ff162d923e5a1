"""Which float module type is replaced by which quantized wrapper.

Toolkit adapters add their own module types with :func:`register`. Lookup is by *exact* type:
a subclass may change ``forward`` (SpeechBrain's ``Decoder`` is a ``ConvTranspose1d`` subclass
that reshapes its input), so it needs a wrapper of its own; until it has one it stays float and
:func:`~fqss_plugin.coverage_report` lists it.
"""
from __future__ import annotations

from torch import nn

_WRAPPERS: dict[type[nn.Module], type[nn.Module]] = {}


def register(float_type: type[nn.Module], wrapper: type[nn.Module]) -> None:
    """Let :func:`~fqss_plugin.prepare` convert modules of exactly ``float_type`` into ``wrapper``.

    ``wrapper`` must subclass ``float_type`` (modules are converted in place, so every reference
    to them, ``isinstance`` checks and upstream parameter names keep working) and provide
    ``convert_(module, config)``.
    """
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise TypeError(f"register: float_type must be an nn.Module subclass, got {float_type!r}")
    if not (isinstance(wrapper, type) and issubclass(wrapper, float_type) and hasattr(wrapper, "convert_")):
        raise TypeError(f"register: wrapper {wrapper!r} must subclass {float_type.__name__} and define convert_()")
    _WRAPPERS[float_type] = wrapper


def wrapper_for(module: nn.Module) -> type[nn.Module] | None:
    """The wrapper registered for ``type(module)``, or None."""
    return _WRAPPERS.get(type(module))
