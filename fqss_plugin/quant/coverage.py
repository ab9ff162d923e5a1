"""Which tensors of a model are quantized, and which computations stay in float.

:func:`coverage_report` looks at a model twice:

* **statically**: every quantizer (weight and activation points, input splitter, output
  combiner), every module that computes in float because it has no wrapper, and the float
  internals that wrappers keep by design (their ``float_internals``: norm statistics, biases, ...);
* **dynamically**, when given an example input: it runs a copy of the model under a
  ``TorchFunctionMode`` that follows every tensor. An arithmetic op produces a *float* tensor;
  a quantizer puts it back *on the grid*; shape-only ops (view, cat, pad, ...) keep the state of
  their inputs. An op whose float output is consumed by another arithmetic op before being
  quantized is reported, with the module it ran in: this finds functional code such as
  ``x + residual`` or ``mask * features`` that no module walk can see. The float op wrapped by
  an :class:`OutputQuantized` module counts as one op, whatever it computes internally; a float
  tensor that such a module takes in is reported like one consumed by any other op.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .layers import OutputQuantized, QuantizedModule
from .signal_io import InputSplitter, OutputCombiner, SplitActivationQuantizer
from .state import QUANTIZER_TYPES, is_weight_quantizer

GRID_MODULES = QUANTIZER_TYPES + (InputSplitter, OutputCombiner, SplitActivationQuantizer)
"""Modules whose outputs are on an integer grid (or, for the combiner and the split quantizer, a sum of
such outputs or of the integer ops run on them)."""

SHAPE_MODULES = (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d,
                 nn.Sequential, nn.ModuleList, nn.ModuleDict)

SHAPE_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "squeeze", "unsqueeze", "flatten",
    "unflatten", "contiguous", "expand", "expand_as", "repeat", "narrow", "select", "__getitem__", "split",
    "chunk", "unbind", "cat", "concat", "stack", "pad", "flip", "roll", "clone", "detach", "to", "cpu", "cuda",
    "movedim", "unfold", "split_with_sizes", "tensor_split", "index_select", "gather", "tile", "dropout",
    "type", "float",
})
"""Ops that only move values around (zero padding included: 0 is exactly representable; dropout is the
identity in eval mode, where the tracer runs; ``type``/``float`` casts between float dtypes, e.g.
SpeechBrain's ``torch.zeros(...).type(x.dtype)`` padding)."""

FILL_OPS = frozenset({"masked_fill"})
"""Ops that overwrite selected entries with a constant: they keep their input's state when the
constant is 0 (on every grid) or +-inf (a position excluded from a softmax: a masked softmax)."""

SCALING_OPS = frozenset({"mul", "div", "true_divide", "__mul__", "__rmul__", "__truediv__", "__imul__",
                         "__itruediv__"})

CREATION_OPS = frozenset({"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "arange", "empty",
                          "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "tensor", "eye"})

@dataclass
class QuantPoint:
    name: str
    kind: str
    detail: str


@dataclass
class CoverageReport:
    """Result of :func:`coverage_report`; ``print(report)`` shows it."""

    model_name: str
    quantized: list[QuantPoint] = field(default_factory=list)
    float_modules: list[str] = field(default_factory=list)
    float_ops: dict[str, int] = field(default_factory=dict)
    by_design: list[str] = field(default_factory=list)
    traced: bool = False

    @property
    def fully_quantized(self) -> bool:
        """No float module and no float op outside the documented by-design points."""
        return not self.float_modules and not self.float_ops

    def points(self, kind: str | None = None) -> list[str]:
        return [p.name for p in self.quantized if kind is None or p.kind == kind]

    def __str__(self) -> str:
        kinds = Counter(p.kind for p in self.quantized)
        lines = [f"FQSS coverage report for {self.model_name}",
                 f"  quantized points: {len(self.quantized)} (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"]
        lines += [f"    [{p.kind}] {p.name}: {p.detail}" for p in self.quantized]
        lines.append(f"  float modules (no wrapper): {len(self.float_modules)}")
        lines += [f"    {name}" for name in self.float_modules]
        if self.traced:
            lines.append(f"  float ops (output used unquantized): {len(self.float_ops)}")
            lines += [f"    {op} (x{count})" for op, count in self.float_ops.items()]
        else:
            lines.append("  float ops: not traced (pass an example input to find functional float ops)")
        lines.append("  float by design:")
        lines += [f"    {note}" for note in self.by_design]
        lines.append("  verdict: " + ("fully quantized" if self.fully_quantized else "NOT fully quantized"))
        return "\n".join(lines)


def coverage_report(model: nn.Module, example_input: torch.Tensor | tuple | None = None) -> CoverageReport:
    """List every quantized point of ``model`` and every computation left in float.

    Args:
        model: a model prepared with :func:`~fqss_plugin.prepare` (or any module).
        example_input: optional input (a tensor, or a tuple of positional arguments). With it, a
            deep copy of the model is run once to find float functional ops; the model itself is
            not touched (its quantizers are not calibrated by the example).
    """
    report = CoverageReport(type(model).__name__)
    notes: set[str] = set()
    covered = [name for name, m in model.named_modules() if getattr(m, "covers_children", False)]
    for name, module in model.named_modules():
        if isinstance(module, GRID_MODULES):
            report.quantized.append(_describe_point(name, module))
        note = getattr(module, "float_internals", None)
        if note:
            notes.add(note)
        if _computes_in_float(module) and not any(name.startswith(c + ".") for c in covered if c):
            report.float_modules.append(f"{name or '<root>'} ({type(module).__name__})")
    report.by_design = sorted(notes)
    if example_input is not None:
        report.float_ops = _trace_float_ops(model, example_input)
        report.traced = True
    return report


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedModule)


def _describe_point(name: str, module: nn.Module) -> QuantPoint:
    if isinstance(module, InputSplitter):
        return QuantPoint(name, "input", f"{module.splits} x {module.bits}-bit signals")
    if isinstance(module, OutputCombiner):
        return QuantPoint(name, "output", f"{module.splits} x {module.bits}-bit outputs")
    if isinstance(module, SplitActivationQuantizer):
        return QuantPoint(name, "activation", f"{module.splits} x {module.bits}-bit tensors")
    kind = "weight" if is_weight_quantizer(module) else "activation"
    return QuantPoint(name, kind, module.extra_repr())


def _computes_in_float(module: nn.Module) -> bool:
    """A module that is neither quantized, a quantizer, nor a pure container/shape module."""
    if _is_quantized(module) or isinstance(module, GRID_MODULES + SHAPE_MODULES):
        return False
    has_own_params = any(True for _ in module.parameters(recurse=False))
    is_leaf = not any(True for _ in module.children())
    return has_own_params or (is_leaf and type(module).forward is not nn.Module.forward)


class _FloatOpTracer(TorchFunctionMode):
    """Follows every floating-point tensor: ``None`` = on a grid, a string = the float op that made it."""

    def __init__(self, names: dict[nn.Module, str]) -> None:
        super().__init__()
        self.names = names
        self.state: dict[int, tuple[torch.Tensor, str | None]] = {}
        self.stack: list[nn.Module] = []
        self.float_ops: Counter[str] = Counter()

    # module stack, maintained by global forward hooks
    def enter(self, module: nn.Module, inputs) -> None:
        if isinstance(module, OutputQuantized) and not self._inside_grid_module():
            # its float op runs unseen (as one op): a float tensor it takes in is consumed unquantized
            for tensor in _float_tensors(inputs):
                self._consume(tensor)
        self.stack.append(module)

    def leave(self, module: nn.Module, _inputs, output) -> None:
        self.stack.pop()
        if isinstance(module, GRID_MODULES) and not self._inside_grid_module():
            for tensor in _float_tensors(output):
                self.state[id(tensor)] = (tensor, None)

    def _inside_grid_module(self) -> bool:
        """Inside a quantizer, or inside the float op of an :class:`OutputQuantized` wrapper."""
        return any(isinstance(m, GRID_MODULES + (OutputQuantized,)) for m in self.stack)

    def _where(self) -> str:
        for module in reversed(self.stack):
            name = self.names.get(module)
            if name is not None:
                return name or "<root>"
        return "<root>"

    def mark(self, tensors, label: str | None) -> None:
        for tensor in _float_tensors(tensors):
            self.state[id(tensor)] = (tensor, label)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._inside_grid_module():
            return out
        op = _op_name(func)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = _float_tensors(out)
        if op in CREATION_OPS or not outputs:
            self.mark(outputs, None)
            return out
        known = [self.state[id(t)][1] for t in inputs if id(t) in self.state]
        if (op in SHAPE_OPS or (op in FILL_OPS and _fills_grid_constant(args, kwargs))
                or _scales_by_a_constant(op, args, inputs)):
            pending = [label for label in known if label is not None]
            self.mark(outputs, pending[0] if pending else None)
            return out
        inside_wrapper = any(_is_quantized(m) for m in self.stack)
        for tensor in inputs:
            if not self._consume(tensor) and isinstance(tensor, nn.Parameter) and not inside_wrapper:
                self.float_ops[f"float parameter used by {op} in {self._where()}"] += 1
        self.mark(outputs, f"{op} in {self._where()}")
        return out

    def _consume(self, tensor: torch.Tensor) -> bool:
        """Count ``tensor`` as a float op's output used unquantized, if it is one (each only once)."""
        label = self.state.get(id(tensor), (None, None))[1]
        if label is None:
            return False
        self.float_ops[label] += 1
        self.state[id(tensor)] = (tensor, None)
        return True


def _fills_grid_constant(args, kwargs) -> bool:
    """``masked_fill(x, mask, value)`` with a Python ``value`` of 0 or +-inf."""
    value = args[2] if len(args) > 2 else kwargs.get("value")
    return isinstance(value, (int, float)) and (value == 0 or math.isinf(value))


def _scales_by_a_constant(op: str, args: tuple, inputs: list[torch.Tensor]) -> bool:
    """``x * c`` or ``x / c`` with a Python number ``c``: a change of scale, free on integer engines
    (folded into the requantization), so the result keeps the state of ``x``."""
    return (op in SCALING_OPS and len(inputs) == 1 and len(args) == 2
            and any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args))


def _op_name(func) -> str:
    """``add_`` -> ``add``; dunder methods keep their name."""
    name = getattr(func, "__name__", str(func))
    return name if name.startswith("__") else name.removesuffix("_")


def _float_tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def _trace_float_ops(model: nn.Module, example_input) -> dict[str, int]:
    model = copy.deepcopy(model).eval()
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    tracer = _FloatOpTracer({m: n for n, m in model.named_modules()})
    pre = nn.modules.module.register_module_forward_pre_hook(tracer.enter)
    post = nn.modules.module.register_module_forward_hook(tracer.leave)
    try:
        with tracer:
            tracer.mark(args, "unquantized model input")
            output = model(*args)
            for tensor in _float_tensors(output):
                label = tracer.state.get(id(tensor), (None, "unknown op"))[1]
                if label is not None:
                    tracer.float_ops[f"model output not quantized ({label})"] += 1
    finally:
        pre.remove()
        post.remove()
    return dict(tracer.float_ops)
