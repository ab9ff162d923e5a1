"""The export view of a quantized separator: a frozen copy whose ``forward`` traces to a clean QDQ graph.

:func:`export_view` deep-copies the model, freezes its quantizers (:func:`fqss_plugin.freeze`: plain
``torch.fake_quantize_*`` ops with buffers, which the exporter turns into QuantizeLinear /
DequantizeLinear) and swaps, in place on the copy, a few classes for export variants that compute
the same values with ops the legacy TorchScript exporter writes plainly:

* the :class:`~fqss_plugin.quant.signal_io.InputSplitter` keeps its floor-based split (Abs,
  ReduceMax, Div, Floor, Clip: the graph takes the raw waveform) and marks every split signal as a
  signed 8-bit tensor of step ``Δ`` with a Q/DQ pair. The split signals are exactly on that grid,
  so the pair is an identity, but it lets onnxruntime run the encoder convolutions as QLinearConv;
* every :class:`~fqss_plugin.quant.QLSTM` runs its time loop through one placeholder per layer and
  direction, which the export turns into an ONNX ``Loop`` (:mod:`fqss_plugin.export.recurrent`);
* the :class:`~fqss_plugin.quant.signal_io.OutputCombiner` and the
  :class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer` quantize their residual parts through
  named modules, so that every activation Q/DQ pair of the graph belongs to a module
  (:func:`quantizer_calls` records them in graph order, for the per-quantizer parity report);
* then the rewrites the toolkit adapters registered (:mod:`fqss_plugin.export.registry`), e.g. the
  Asteroid filterbanks, layer norms and dual-path ``fold`` (:mod:`fqss_plugin.asteroid.export`).

Everything here is bit-identical to the frozen model in torch except ``decoder="matmul"`` (a
filterbank decoder written as an integer MatMul plus overlap-add), whose float overlap-add sums the
same products in another order (checked by the tests); the parity report
compares onnxruntime against this torch computation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..quant.prepare import freeze
from ..quant.quantizers import FrozenActivationQuantizer
from ..quant.signal_io import InputSplitter, OutputCombiner, SplitActivationQuantizer, grid_step, split_signal
from ..quant.state import QUANTIZER_TYPES, is_quantized, is_weight_quantizer
from .recurrent import export_lstms
from .registry import ExportOptions, rewrites


class ExportError(ValueError):
    """The model cannot be exported (not quantized, never calibrated, or an unsupported part)."""


class GridQuantizer(nn.Module):
    """Per-tensor fake-quantization with a fixed step and zero point, signed or unsigned.

    Used where the value is known to lie on the grid already (an identity in torch) or where
    the published method quantizes with fixed parameters (the combiner's residual outputs).
    """

    def __init__(self, scale: torch.Tensor, zero_point: int, q_min: int, q_max: int) -> None:
        super().__init__()
        self.q_min, self.q_max = q_min, q_max
        self.register_buffer("scale", scale.detach().clone().float().reshape(1))
        self.register_buffer("zero_point", torch.full((1,), zero_point, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.q_min, self.q_max)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.3g}, zero_point={int(self.zero_point)}, range=[{self.q_min}, {self.q_max}]"


TAP_TYPES = (FrozenActivationQuantizer, GridQuantizer)
"""Modules whose every call is one activation QuantizeLinear/DequantizeLinear pair in the graph."""


class ExportInputSplitter(InputSplitter):
    """:class:`InputSplitter` whose split signals go through a signed 8-bit Q/DQ pair (exact)."""

    def _add_grid_quantizers(self) -> None:
        step = torch.tensor(grid_step(self.bits))
        self.grid_quantizers = nn.ModuleList(
            GridQuantizer(step, 0, -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) for _ in range(self.splits))
        # one parameter per split kernel: the exporter writes them as initializers (not a Split op)
        self.split_weights = nn.ParameterList(nn.Parameter(w.detach().clone(), requires_grad=False)
                                              for w in self.extra_weight)

    def forward(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        if self.signal_scale is not None:
            x = self.signal_scale.normalize(x, peak=1.0 - grid_step(self.bits))
        signals = [q(s) for q, s in zip(self.grid_quantizers, split_signal(x, self.bits, self.splits))]
        out = layer.linear_op(signals[0], layer.weight_quantizer(layer.weight), layer.bias)
        for signal, weight, quantizer in zip(signals[1:], self.split_weights, self.weight_quantizers):
            out = out + layer.linear_op(signal, quantizer(weight), None)
        return out


class ExportResidualQuantizers:
    """Mixin of the export variants of :class:`OutputCombiner` and :class:`SplitActivationQuantizer`: the
    residual parts go through :class:`GridQuantizer` modules (same values), one Q/DQ pair each."""

    def _add_residual_quantizers(self, scale: torch.Tensor) -> None:
        self.residual_quantizers = nn.ModuleList(
            GridQuantizer(scale, 2 ** (self.bits - 1), 0, 2 ** self.bits - 1) for _ in range(1, self.splits))

    def residual_quantizer(self, scale: torch.Tensor):
        return lambda i, residual: self.residual_quantizers[i - 1](residual)


class ExportOutputCombiner(ExportResidualQuantizers, OutputCombiner):
    """:class:`OutputCombiner` with its residual quantizers as modules."""


class ExportSplitActivationQuantizer(ExportResidualQuantizers, SplitActivationQuantizer):
    """:class:`SplitActivationQuantizer` with its residual quantizers as modules."""


def swap_class(module: nn.Module, attrs: dict) -> None:
    """Give ``module`` (on the export copy) a subclass of its own class with ``attrs`` overridden."""
    module.__class__ = type(f"Export{type(module).__name__}", (type(module),), attrs)


class WaveformSeparator(nn.Module):
    """``[batch, time]`` mixture -> ``[batch, n_src, time]`` estimates (the exported signature)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def frozen(cls, model: nn.Module) -> WaveformSeparator:
        """A frozen copy of ``model`` on CPU with the exported signature (``model`` is not modified): the
        torch reference an exported file is compared with."""
        return cls(freeze(copy.deepcopy(model).cpu().eval())).eval()

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        out = self.model(mixture)
        return out.unsqueeze(1) if out.dim() == 2 else out


def export_view(model: nn.Module, decoder: str = "conv", staged_norm_means: bool = False) -> WaveformSeparator:
    """A frozen, export-ready copy of ``model`` (``model`` itself is not modified).

    Args:
        model: a separator prepared with :func:`fqss_plugin.prepare` and trained or at least
            calibrated (every quantizer must have seen data), frozen or not.
        decoder: ``"conv"`` (ConvTranspose, float in onnxruntime) or ``"matmul"`` (integer MatMul
            plus overlap-add; filterbank decoders whose kernel is a multiple of the stride).
        staged_norm_means: in ONNX, take each gLN mean one axis at a time (:mod:`fqss_plugin.asteroid.export`): its
            error stays at float32 precision on any input length, where onnxruntime's joint
            ``ReduceMean`` drifts on long inputs; about 40% slower on the embedded ConvTasNet.
    """
    if decoder not in ("conv", "matmul"):
        raise ExportError(f"decoder must be 'conv' or 'matmul', got {decoder!r}")
    if not isinstance(model, nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not is_quantized(model):
        raise ExportError(f"{type(model).__name__} has no fqss quantizer: export needs a model prepared with "
                          "fqss_plugin.prepare and trained (a float model has no int8 graph to export)")
    _check_supported(model)
    view = copy.deepcopy(model).cpu().eval()
    try:
        freeze(view)
    except RuntimeError as error:
        raise ExportError(f"cannot freeze {type(model).__name__}: {error}") from None
    _rewrite(view, ExportOptions(decoder=decoder, staged_norm_means=staged_norm_means))
    return WaveformSeparator(view).eval()


def _check_supported(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZER_TYPES):
            continue
        if is_weight_quantizer(module):
            if module.bits > 8:
                raise ExportError(f"{name}: {module.bits}-bit weight quantizer; the ONNX QDQ export stores weights "
                                  "of at most 8 bits (int8)")
        elif module.bits != 8:
            raise ExportError(f"{name}: {module.bits}-bit activation quantizer; the ONNX QDQ export writes 8-bit "
                              "activations only")


def _rewrite(model: nn.Module, options: ExportOptions) -> None:
    for module in list(model.modules()):
        if type(module) is InputSplitter:
            module.__class__ = ExportInputSplitter
            module._add_grid_quantizers()
    for module in model.modules():
        if isinstance(getattr(module, "output_combiner", None), OutputCombiner):
            module.output_combiner.__class__ = ExportOutputCombiner
            module.output_combiner._add_residual_quantizers(module.output_quantizer.qparams()[0])
        for quantizer in (getattr(module, "input_quantizer", None), getattr(module, "output_quantizer", None)):
            if type(quantizer) is SplitActivationQuantizer:
                quantizer.__class__ = ExportSplitActivationQuantizer
                quantizer._add_residual_quantizers(quantizer.first.qparams()[0])
    export_lstms(model)
    for rewrite in rewrites():
        rewrite(model, options)


@dataclass
class QuantizerCall:
    """One call of an activation quantizer: one QuantizeLinear node of the exported graph."""

    name: str
    scale: float
    zero_point: int
    output: torch.Tensor | None = None


@torch.no_grad()
def quantizer_calls(view: nn.Module, mixture: torch.Tensor, keep_outputs: bool = False,
                    force: dict[str, torch.Tensor] | None = None) -> tuple[list[QuantizerCall], torch.Tensor]:
    """Run ``view`` and list its activation quantizer calls in execution (= graph) order.

    A module called more than once gets ``#k`` appended from its second call on. With ``force``
    (call name -> integer codes), a call's output is recorded and then *replaced* by the given codes
    (dequantized with its own step and zero point): every op downstream then sees those inputs.
    """
    names = {m: n for n, m in view.named_modules()}
    calls: list[QuantizerCall] = []
    seen: dict[str, int] = {}

    def hook(module, _inputs, output):
        name = names[module]
        count = seen.get(name, 0)
        seen[name] = count + 1
        call = QuantizerCall(name if count == 0 else f"{name}#{count}", float(module.scale.reshape(-1)[0]),
                             int(module.zero_point.reshape(-1)[0]), output.detach().clone() if keep_outputs else None)
        calls.append(call)
        if force is not None and call.name in force:
            codes = force[call.name].to(torch.float32).reshape(output.shape)
            return (codes - call.zero_point) * module.scale.reshape(-1)[0]
        return None

    handles = [m.register_forward_hook(hook) for m in view.modules() if isinstance(m, TAP_TYPES)]
    try:
        out = view(mixture)
    finally:
        for handle in handles:
            handle.remove()
    return calls, out
