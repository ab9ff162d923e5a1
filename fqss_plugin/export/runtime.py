"""Running exported models with onnxruntime: :class:`OrtSeparator`, the op report and the parity report."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .chunks import separate_in_chunks
from .passes import _all_nodes

INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
               "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax", "QLinearWhere",
               "QLinearReduceMean", "QGemm", "QAttention", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "QLinearReduceMean"}
"""onnxruntime kernels that compute on int8/uint8 data (int32 accumulation)."""
CONVERSION_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
DATA_MOVEMENT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Shape", "Gather", "Slice", "Concat", "Pad",
                     "Cast", "Constant", "ConstantOfShape", "Identity", "Expand", "Split", "Size", "Range",
                     "ReorderInput", "ReorderOutput", "Tile", "Unsqueeze"}
"""Ops that only move or shape data (ReorderInput/Output: the NCHWc layout transformer)."""


@dataclass
class OpReport:
    """What onnxruntime actually runs, read from its optimized graph (level ORT_ENABLE_ALL)."""

    integer: Counter = field(default_factory=Counter)
    float_compute: Counter = field(default_factory=Counter)
    conversion: Counter = field(default_factory=Counter)
    data_movement: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        def fmt(c: Counter) -> str:
            return ", ".join(f"{op} x{n}" for op, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"
        return (f"integer kernels: {fmt(self.integer)}\nfloat compute: {fmt(self.float_compute)}\n"
                f"Q/DQ conversions: {fmt(self.conversion)}\nshape/data movement: {fmt(self.data_movement)}")


def session_options(threads: int = 1, optimized_path: str | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return options


def ort_op_report(path: str | Path) -> OpReport:
    """Classify the ops of the graph onnxruntime runs for the model at ``path`` (CPU provider)."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(path), session_options(1, optimized), providers=["CPUExecutionProvider"])
        graph = onnx.load(optimized).graph
    report = OpReport()
    for node in _all_nodes(graph):                        # Loop bodies (the LSTMs' time steps) included
        op = node.op_type
        bucket = report.integer if op in INTEGER_OPS else report.conversion if op in CONVERSION_OPS else \
            report.data_movement if op in DATA_MOVEMENT_OPS else report.float_compute
        bucket[op] += 1
    return report


class OrtSeparator:
    """An exported separator on onnxruntime, called like the torch model.

    ``separate(mixture)`` takes a ``[time]``, ``[batch, time]`` or ``[batch, 1, time]`` waveform
    (numpy or torch, any length) and returns ``[n_src, time]`` / ``[batch, n_src, time]`` estimates
    of the same type, as ``model(mixture)`` does for an Asteroid model. Recordings longer than
    ``chunk_seconds`` are separated in chunks overlapping by ``overlap_seconds`` (:mod:`.chunks`: bounded
    memory, the same source order throughout); ``chunk_seconds=None``: always in one piece.
    """

    def __init__(self, path: str | Path, threads: int = 1, chunk_seconds: float | None = 30.0,
                 overlap_seconds: float = 1.0) -> None:
        import onnxruntime as ort
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX model")
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime raises several types for a bad file
            raise ValueError(f"{path}: onnxruntime cannot load it ({type(error).__name__}: {error})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        _refuse_if_it_would_saturate(self.path, self.metadata)
        self.sample_rate = int(meta["sample_rate"]) if meta.get("sample_rate") else None
        self.n_src = int(meta["n_src"]) if meta.get("n_src") else None
        self.audio_channels = int(meta.get("audio_channels", 1))
        self.sources = meta["sources"].split(",") if meta.get("sources") else None
        self.input_normalization = meta.get("input_normalization")
        if self.input_normalization not in (None, "mono_mean_std"):
            raise ValueError(f"{path}: unknown input_normalization {self.input_normalization!r} in its metadata")
        self.input_name = self.session.get_inputs()[0].name
        self.chunk_seconds, self.overlap_seconds = chunk_seconds, overlap_seconds

    def forward(self, mixture: np.ndarray) -> np.ndarray:
        """``[batch, time]`` float32 -> ``[batch, n_src, time]``."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(mixture, dtype=np.float32)})[0]

    def separate(self, mixture):
        """Mono models: ``[time]`` or ``[batch, time]`` (or ``[batch, 1, time]``) -> ``[(batch,) n_src, time]``.
        Multichannel models: ``[channels, time]`` or ``[batch, channels, time]`` -> ``[(batch,) n_src, channels,
        time]``, normalised first as the metadata says (``mono_mean_std``: by the mean and standard deviation of
        the whole recording's mono downmix, as ``demucs.separate`` does) and de-normalised after."""
        is_torch = isinstance(mixture, torch.Tensor)
        wav = mixture.detach().cpu().numpy() if is_torch else np.asarray(mixture)
        if self.audio_channels == 1:
            if wav.ndim == 3:
                if wav.shape[1] != 1:
                    raise ValueError(f"OrtSeparator: expected a mono [batch, 1, time] mixture, got shape {wav.shape}")
                wav = wav[:, 0]
            if wav.ndim not in (1, 2):
                raise ValueError(f"OrtSeparator: expected [time], [batch, time] or [batch, 1, time], got shape {wav.shape}")
            unbatched = wav.ndim == 1
        else:
            if wav.ndim not in (2, 3) or wav.shape[-2] != self.audio_channels:
                raise ValueError(f"OrtSeparator: expected [{self.audio_channels}, time] or [batch, "
                                 f"{self.audio_channels}, time], got shape {wav.shape}")
            unbatched = wav.ndim == 2
        batch = (wav[None] if unbatched else wav).astype(np.float32)
        mean = std = None
        if self.input_normalization == "mono_mean_std":
            mono = batch.mean(axis=-2, keepdims=True)                       # [batch, 1, time]
            mean, std = mono.mean(axis=-1, keepdims=True), mono.std(axis=-1, keepdims=True) + 1e-8
            batch = (batch - mean) / std
        if self.chunk_seconds and self.sample_rate:          # bounded memory on long recordings (:mod:`.chunks`)
            out = separate_in_chunks(self.forward, batch, round(self.chunk_seconds * self.sample_rate),
                                     round(self.overlap_seconds * self.sample_rate), align=self.sources is None)
        else:
            out = self.forward(batch)
        if mean is not None:
            out = out * std[:, None] + mean[:, None]
        out = out[0] if unbatched else out
        return torch.from_numpy(out).to(mixture.device) if is_torch else out

    __call__ = separate


def open_separator(path: str | Path, threads: int = 1, chunk_seconds: float | None = 30.0):
    """The runtime of an exported file: :class:`OrtSeparator` for ``mixture -> sources`` graphs, or the runtime
    an adapter registered for the ``architecture`` in the file's metadata (e.g. HTDemucs, whose STFT runs
    outside the graph)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such ONNX model")
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as error:  # noqa: BLE001 - a malformed file: one clear message
        raise ValueError(f"{path}: not an ONNX model ({type(error).__name__}: {error})") from None
    if props.get("architecture"):
        from .registry import runtime_for
        return runtime_for(props["architecture"])(path, threads, chunk_seconds)
    return OrtSeparator(path, threads=threads, chunk_seconds=chunk_seconds)


def _refuse_if_it_would_saturate(path: Path, metadata: dict) -> None:
    """A file whose integer ops can saturate (:mod:`.saturation`) gives wrong output on this CPU if it has no
    VNNI: refuse it with the reason, whatever its metadata says (files from other exporters included)."""
    from . import cpu, saturation
    if not cpu.cpu_saturates_u8s8():
        return
    risks = saturation.saturation_risks(onnx.load(str(path), load_external_data=False))
    if risks:
        target = metadata.get(saturation.METADATA_KEY)
        raise ValueError(f"{path}: {len(risks)} integer ops of this file can saturate in int16 on this CPU "
                         f"({cpu.describe_cpu()}; first: {risks[0]})"
                         + (" (exported with int8_target=vnni)" if target == saturation.VNNI else "")
                         + ", so onnxruntime would return wrong audio here. Export the model with the default "
                         "target (`fqss export` without --target vnni: portable on every CPU), or run this file "
                         "on a CPU with VNNI")


# -- parity ---------------------------------------------------------------------------------------

@dataclass
class QuantizerParity:
    """Agreement of one activation quantizer's integer codes between torch and onnxruntime."""

    name: str
    numel: int
    differ: float           # free-running: fraction of codes that differ at all
    beyond_1lsb: float      # free-running: fraction that differ by more than 1 LSB
    max_lsb: int
    local_differ: float     # same inputs (torch fed with onnxruntime's upstream codes): fraction that differ
    local_beyond_1lsb: float
    local_max_lsb: int
    snr_db: float = float("inf")  # free-running: onnxruntime's values vs torch's (dequantized codes)
    derived: bool = False   # a combiner residual: it encodes the previous output's rounding error, so a
                            # 1-LSB flip upstream moves it by 2^b - 1 codes (free-running figures meaningless)


@dataclass
class ParityReport:
    snr_db: float                       # onnxruntime output vs torch fake-quant output
    max_abs: float
    quantizers: list[QuantizerParity]

    @property
    def worst_beyond_1lsb(self) -> float:
        """Free-running, over the quantizers that are not combiner residuals."""
        return max((q.beyond_1lsb for q in self.quantizers if not q.derived), default=0.0)

    @property
    def worst_local_beyond_1lsb(self) -> float:
        return max((q.local_beyond_1lsb for q in self.quantizers), default=0.0)

    @property
    def worst_local_differ(self) -> float:
        return max((q.local_differ for q in self.quantizers), default=0.0)

    def __str__(self) -> str:
        lines = [f"output: {self.snr_db:.1f} dB SNR vs torch fake-quant, max abs diff {self.max_abs:.3g}",
                 "integer codes that differ, free-running (torch and onnxruntime each on their own) and local "
                 "(torch fed with onnxruntime's upstream codes):",
                 f"{'quantizer':52s} {'values':>8s} {'SNR dB':>6s} {'!=':>7s} {'>1 LSB':>7s} {'max':>4s} | "
                 f"{'local !=':>8s} {'>1 LSB':>7s} {'max':>4s}"]
        lines += [f"{q.name:52s} {q.numel:8d} {q.snr_db:6.1f} {q.differ:7.2%} {q.beyond_1lsb:7.2%} {q.max_lsb:4d} | "
                  f"{q.local_differ:8.3%} {q.local_beyond_1lsb:7.3%} {q.local_max_lsb:4d}"
                  + ("  (combiner residual)" if q.derived else "") for q in self.quantizers]
        return "\n".join(lines)

    def as_rows(self) -> list[dict]:
        return [vars(q) for q in self.quantizers]


def snr_db(estimate: np.ndarray, reference: np.ndarray) -> float:
    noise = float(np.sum((np.asarray(reference, np.float64) - estimate) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(np.asarray(reference, np.float64) ** 2)) / noise)


def with_quantizer_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[str, int]]]:
    """A copy of ``model`` whose tagged activation QuantizeLinear outputs are graph outputs too, and for each
    such tensor the quantizer's name and the node's zero point (codes minus it are the quantized integers,
    whether the file stores them as int8 or, for an integer kernel, as uint8)."""
    from .export import TAG
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    inits = {t.name: t for t in tapped.graph.initializer}
    names = {}
    for node in tapped.graph.node:
        if node.op_type == "QuantizeLinear" and node.name.startswith(TAG):
            zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
            elem = zero_point.data_type if zero_point is not None else onnx.TensorProto.UINT8
            tapped.graph.output.append(helper.make_tensor_value_info(node.output[0], elem, None))
            zero = int(numpy_helper.to_array(zero_point).reshape(-1)[0]) if zero_point is not None else 0
            names[node.output[0]] = (node.name[len(TAG):], zero)
    return tapped, names


def parity_report(model: torch.nn.Module, path: str | Path, mixture: torch.Tensor) -> ParityReport:
    """Compare the exported model at ``path`` with the torch ``model`` on ``mixture`` (``[batch, time]``).

    End to end (SNR, max abs difference) against the frozen torch model, and per activation
    quantizer: the fraction of integer codes that differ, and that differ by more than 1 LSB.
    """
    import onnxruntime as ort
    from .export import load_export_settings
    from .view import WaveformSeparator, export_view, quantizer_calls
    onnx_model = onnx.load(str(path))
    view = export_view(model, **load_export_settings(onnx_model))
    calls, _ = quantizer_calls(view, mixture, keep_outputs=True)
    with torch.no_grad():
        reference = WaveformSeparator.frozen(model)(mixture)
    tapped, names = with_quantizer_outputs(onnx_model)
    session = ort.InferenceSession(tapped.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    results = dict(zip(output_names, session.run(None, {session.get_inputs()[0].name: mixture.numpy()})))
    estimate = results[output_names[0]]
    free_by_name = {c.name: c for c in calls}
    ort_codes = {name: torch.from_numpy(results[tensor].astype(np.int64) - zero + free_by_name[name].zero_point)
                 for tensor, (name, zero) in names.items() if name in free_by_name}    # in torch's zero point
    forced, _ = quantizer_calls(view, mixture, keep_outputs=True, force=ort_codes)
    forced_by_name = {c.name: c for c in forced}
    rows = []
    for name, codes in ort_codes.items():
        if name not in free_by_name or name not in forced_by_name:
            continue
        stats = []
        for call in (free_by_name[name], forced_by_name[name]):
            torch_codes = torch.round(call.output / call.scale).to(torch.int64) + call.zero_point
            diff = (torch_codes - codes.reshape(torch_codes.shape)).abs()
            stats += [float((diff > 0).float().mean()), float((diff > 1).float().mean()), int(diff.max())]
        free = free_by_name[name]
        ort_values = (codes.reshape(free.output.shape).double() - free.zero_point) * free.scale
        rows.append(QuantizerParity(name.removeprefix("model."), codes.numel(), *stats,
                                    snr_db=snr_db(ort_values.numpy(), free.output.double().numpy()),
                                    derived="residual_quantizers" in name))
    ref = reference.numpy()
    return ParityReport(snr_db(estimate, ref), float(np.abs(estimate - ref).max()), rows)

