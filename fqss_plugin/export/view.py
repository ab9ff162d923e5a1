"""The export view of a quantized separator: a frozen copy whose ``forward`` traces to a clean QDQ graph.

:func:`export_view` deep-copies the model, freezes its quantizers (:func:`fqss_plugin.freeze`: plain
``torch.fake_quantize_*`` ops with buffers, which the exporter turns into QuantizeLinear /
DequantizeLinear) and swaps, in place on the copy, a few classes for export variants that compute
the same values with ops the legacy TorchScript exporter writes plainly:

* the :class:`~fqss_plugin.quant.signal_io.InputSplitter` keeps its floor-based split (Abs,
  ReduceMax, Div, Floor, Clip: the graph takes the raw waveform) and marks every split signal as a
  signed 8-bit tensor of step ``Δ`` with a Q/DQ pair. The split signals are exactly on that grid,
  so the pair is an identity, but it lets onnxruntime run the encoder convolutions as QLinearConv;
* the filterbank encoder/decoder call ``F.conv1d`` / ``F.conv_transpose1d`` directly instead of
  Asteroid's shape-dispatching ``multishape_*`` helpers; the decoder can also be written as an
  integer MatMul plus overlap-add (``decoder="matmul"``), for which onnxruntime has an int8 kernel,
  while it has none for ConvTranspose;
* every :class:`~fqss_plugin.quant.QLSTM` runs its time loop through one placeholder per layer and
  direction, which the export turns into an ONNX ``Loop`` (:mod:`fqss_plugin.export.recurrent`);
* Asteroid's dual-path ``fold`` (DPTNet, DPRNN: ``F.fold``, an opset-18 ``Col2Im``) is written as pads
  and sums in ``F.fold``'s own summation order (:func:`_overlap_add_fold`);
* Asteroid's ``GlobLN``/``ChanLN`` compute the same values in torch, without the scripted helper
  (which exports as ``If`` nodes), and export as a shorter op chain (:class:`_LayerNormFunction`);
* the :class:`~fqss_plugin.quant.signal_io.OutputCombiner` and the
  :class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer` quantize their residual parts through
  named modules, so that every activation Q/DQ pair of the graph belongs to a module
  (:func:`quantizer_calls` records them in graph order, for the per-quantizer parity report).

Everything here is bit-identical to the frozen model in torch except ``decoder="matmul"``, whose
float overlap-add sums the same products in another order (checked by the tests); the parity report
compares onnxruntime against this torch computation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.prepare import freeze
from ..quant.quantizers import QUANTIZER_TYPES, FrozenActivationQuantizer, FrozenWeightQuantizer, WeightQuantizer
from ..quant.signal_io import InputSplitter, OutputCombiner, SplitActivationQuantizer, grid_step, split_signal
from .recurrent import export_lstms


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


class _LayerNormFunction(torch.autograd.Function):
    """Asteroid's gLN/cLN: in torch the very same kernels (bit-identical); in ONNX a shorter op chain.

    torch: ``gamma * (x - mean) / sqrt(var + eps) + beta`` (``torch.var``, biased), as Asteroid computes it.
    ONNX: ``d = x - mean``, ``a = gamma / sqrt(mean(d*d) + eps)`` (a ``[1, C, 1]`` vector), ``d * a + beta``:
    two full-size float passes fewer than the traced formula (onnxruntime has no fused kernel for a norm over
    channels and time; ``LayerNormalization`` with a per-channel scale measured slower). Same value up to
    float rounding; the parity report measures the effect (codes differing after the norm's quantizer).

    With ``staged``, each mean over several axes is taken one axis at a time, innermost first
    (:func:`_mean`): onnxruntime's ``ReduceMean`` over ``[1, 2]`` sums all ``C*T`` values into one
    float32 accumulator, whose relative error grows with the input length (measured: 5.6e-6 for 128 x 4000
    values, 1.9e-4 for 128 x 32000), while the mean of per-channel means stays near float32 precision (1e-7
    for both). It costs speed: the embedded ConvTasNet ran 24.5 ms joint, 34.0 ms staged (4 s, 1 thread).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, dims: tuple[int, ...], eps: float, staged: bool):
        mean = x.mean(dim=dims, keepdim=True)
        var = torch.var(x, dim=dims, keepdim=True, unbiased=False)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return gamma.reshape(shape) * ((x - mean) / torch.sqrt(var + eps)) + beta.reshape(shape)

    @staticmethod
    def symbolic(g, x, gamma, beta, dims, eps, staged):
        rank = x.type().dim() if x.type().dim() is not None else 3
        shape = g.op("Constant", value_t=torch.tensor([1, -1] + [1] * (rank - 2), dtype=torch.int64))
        mean = _mean(g, x, dims, staged)
        d = g.op("Sub", x, mean)
        var = _mean(g, g.op("Mul", d, d), dims, staged)
        std = g.op("Sqrt", g.op("Add", var, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
        a = g.op("Div", g.op("Reshape", gamma, shape), std)
        return g.op("Add", g.op("Mul", d, a), g.op("Reshape", beta, shape))


def _mean(g, x, dims: tuple[int, ...], staged: bool):
    """``ReduceMean`` over ``dims``; with ``staged`` one axis at a time from the last: every partial mean
    averages the same number of values, so the result is the joint mean, with float32 sums of one axis'
    length only."""
    if not staged:
        return g.op("ReduceMean", x, axes_i=list(dims), keepdims_i=1)
    for axis in sorted(dims, reverse=True):
        x = g.op("ReduceMean", x, axes_i=[axis], keepdims_i=1)
    return x


def _export_norm_forward(self, x: torch.Tensor, EPS: float = 1e-8) -> torch.Tensor:
    """Asteroid's gLN/cLN without the scripted helper (which exports as ``If`` nodes)."""
    return self.output_quantizer(_LayerNormFunction.apply(x, self.gamma, self.beta, self._fqss_norm_dims(x), EPS,
                                                          self._fqss_staged_means))


def _swap_class(module: nn.Module, base: type, attrs: dict) -> None:
    """Give ``module`` a subclass of its own class with ``attrs`` overridden (the copy only)."""
    module.__class__ = type(f"Export{type(module).__name__}", (type(module),), attrs)


def _filterbank_encoder_op(self, x, weight, bias):
    spec = F.conv1d(self.filterbank.pre_analysis(x), weight, stride=self.stride, padding=self.padding)
    return self.filterbank.post_analysis(spec)


def _filterbank_decoder_op(self, x, weight, bias):
    """``F.conv_transpose1d`` on ``[*, N, frames]`` flattened to 3-D, like ``multishape_conv_transpose1d``."""
    lead = x.shape[:-2]
    spec = self.filterbank.pre_synthesis(x).reshape((-1,) + tuple(x.shape[-2:]))
    wav = F.conv_transpose1d(spec, weight, stride=self.stride, padding=self.padding,
                             output_padding=self.output_padding)
    return self.filterbank.post_synthesis(wav.reshape(lead + (-1,)) if len(lead) > 1 else wav)


def _matmul_decoder_op(self, x, weight, bias):
    """The same synthesis as an (integer) MatMul per frame plus an overlap-add of ``K/stride`` shifted parts."""
    n_filters, _, kernel = weight.shape
    stride = self.stride
    lead = x.shape[:-2]
    spec = self.filterbank.pre_synthesis(x).reshape(-1, n_filters, x.shape[-1]).transpose(1, 2)   # [B', F, N]
    frames = torch.matmul(spec, weight.reshape(n_filters, kernel))                                # [B', F, K]
    parts = kernel // stride
    frames = frames.reshape(frames.shape[0], frames.shape[1], parts, stride)
    wav = sum(F.pad(frames[:, :, j], (0, 0, j, parts - 1 - j)) for j in range(parts))           # [B', F+parts-1, S]
    wav = wav.reshape(wav.shape[0], 1, -1)
    if self.padding:
        wav = wav[..., self.padding:wav.shape[-1] - self.padding]
    return self.filterbank.post_synthesis(wav.reshape(lead + (-1,)) if len(lead) > 1 else wav)


def _overlap_add_fold(self, x: torch.Tensor, output_size: int | None = None) -> torch.Tensor:
    """Asteroid's ``DualPathProcessing.fold`` (``F.fold``, which exports as opset-18 ``Col2Im``) as pads and sums.

    Chunk ``s`` covers padded frames ``[s·hop, s·hop + K)``; with ``K = P·hop``, its part ``j`` lands on
    block ``s + j`` of ``hop`` frames. Summing the parts in the order ``j = 0..P-1`` from zero is the
    order ``F.fold`` accumulates them in, so the values are bit-identical.
    """
    output_size = output_size if output_size is not None else self.n_orig_frames
    batch, chan, chunk_size, n_chunks = x.shape
    hop, parts = self.hop_size, self.chunk_size // self.hop_size
    x = x.reshape(batch, chan, parts, hop, n_chunks)
    blocks = sum(F.pad(x[:, :, j], (j, parts - 1 - j)) for j in range(parts))      # [B, C, hop, chunks + P - 1]
    frames = blocks.transpose(2, 3).reshape(batch, chan, -1)[..., chunk_size:chunk_size + output_size]
    return frames / (float(self.chunk_size) / self.hop_size)


class WaveformSeparator(nn.Module):
    """``[batch, time]`` mixture -> ``[batch, n_src, time]`` estimates (the exported signature)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        out = self.model(mixture)
        return out.unsqueeze(1) if out.dim() == 2 else out


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZER_TYPES) for m in model.modules())


def export_view(model: nn.Module, decoder: str = "conv", staged_norm_means: bool = False) -> WaveformSeparator:
    """A frozen, export-ready copy of ``model`` (``model`` itself is not modified).

    Args:
        model: a separator prepared with :func:`fqss_plugin.prepare` and trained or at least
            calibrated (every quantizer must have seen data), frozen or not.
        decoder: ``"conv"`` (ConvTranspose, float in onnxruntime) or ``"matmul"`` (integer MatMul
            plus overlap-add; filterbank decoders whose kernel is a multiple of the stride).
        staged_norm_means: in ONNX, take each gLN mean one axis at a time (``_LayerNormFunction``): its
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
    _rewrite(view, decoder, staged_norm_means)
    return WaveformSeparator(view).eval()


def _check_supported(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZER_TYPES):
            continue
        if isinstance(module, (WeightQuantizer, FrozenWeightQuantizer)):
            if module.bits > 8:
                raise ExportError(f"{name}: {module.bits}-bit weight quantizer; the ONNX QDQ export stores weights "
                                  "of at most 8 bits (int8)")
        elif module.bits != 8:
            raise ExportError(f"{name}: {module.bits}-bit activation quantizer; the ONNX QDQ export writes 8-bit "
                              "activations only")


def _rewrite(model: nn.Module, decoder: str, staged_norm_means: bool) -> None:
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
    _rewrite_asteroid(model, decoder, staged_norm_means)


def _rewrite_asteroid(model: nn.Module, decoder: str, staged_norm_means: bool) -> None:
    try:
        from asteroid.dsp.overlap_add import DualPathProcessing

        from ..asteroid import QChanLN, QFilterbankDecoder, QFilterbankEncoder, QGlobLN
    except ImportError:          # Asteroid is not installed: nothing of it to rewrite
        return
    for module in model.modules():
        if isinstance(module, DualPathProcessing):
            if module.chunk_size % module.hop_size:
                raise ExportError(f"DPTNet/DPRNN export needs a chunk size that is a multiple of the hop size "
                                  f"(chunk {module.chunk_size}, hop {module.hop_size})")
            _swap_class(module, DualPathProcessing, {"fold": _overlap_add_fold})
        if isinstance(module, QGlobLN):
            _swap_class(module, QGlobLN, {"forward": _export_norm_forward, "_fqss_staged_means": staged_norm_means,
                                          "_fqss_norm_dims": lambda self, x: tuple(range(1, x.dim()))})
        elif isinstance(module, QChanLN):
            _swap_class(module, QChanLN, {"forward": _export_norm_forward, "_fqss_staged_means": staged_norm_means,
                                          "_fqss_norm_dims": lambda self, x: (1,)})
        elif isinstance(module, QFilterbankEncoder):
            _swap_class(module, QFilterbankEncoder, {"linear_op": _filterbank_encoder_op})
        elif isinstance(module, QFilterbankDecoder):
            op = _filterbank_decoder_op
            if decoder == "matmul":
                kernel = module.filterbank.kernel_size
                if kernel % module.stride or module.output_padding:
                    raise ExportError(f"decoder='matmul' needs a kernel size that is a multiple of the stride and "
                                      f"no output padding (kernel {kernel}, stride {module.stride})")
                op = _matmul_decoder_op
            _swap_class(module, QFilterbankDecoder, {"linear_op": op})


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
