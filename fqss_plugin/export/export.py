"""``to_onnx``: freeze, export with the TorchScript exporter, run the deploy passes, check."""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from . import passes
from .recurrent import expand_lstm_recurrences
from .view import ExportError, WaveformSeparator, export_view, quantizer_calls

TAG = "fqss:"
"""Prefix of the names given to the activation QuantizeLinear nodes (``fqss:<module name>``)."""
OPSET = 17


@dataclass
class ExportResult:
    path: Path
    bytes: int
    n_src: int
    sample_rate: int | None
    passes: dict[str, int]
    tensor_bytes: dict[str, int]
    tagged_quantizers: int
    notes: list[str] = field(default_factory=list)


def load_export_settings(model: onnx.ModelProto) -> dict:
    """The :func:`export_view` arguments an exported file was made with (its metadata)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta.get("fqss_export", "{}"))


def to_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor | None = None, *,
            decoder: str = "matmul", staged_norm_means: bool = False, integer_softmax: bool = False, opset: int = OPSET,
            deploy: bool = True, sample_rate: int | None = None, metadata: dict | None = None) -> ExportResult:
    """Export a trained fqss separator to an int8 ONNX QDQ model that onnxruntime runs in integer.

    Steps: :func:`~fqss_plugin.freeze` on a copy (the model is not modified), the export view
    (:mod:`fqss_plugin.export.view`), ``torch.onnx.export(..., dynamo=False)`` with a dynamic batch
    and time axis, the deploy passes (:mod:`fqss_plugin.export.passes`) and ``onnx.checker``.

    The graph takes the raw waveform ``mixture: float32 [batch, time]`` (any length) and returns
    ``sources: float32 [batch, n_src, time]``; the FQSS input split (peak normalisation, floor-based
    8-bit split) and the output recombination run inside the graph.

    Args:
        model: a model prepared with :func:`fqss_plugin.prepare` whose quantizers have seen data.
        path: where to write the ``.onnx`` file.
        example_input: a ``[batch, time]`` (or ``[time]``) mixture used for tracing; by default one
            second of noise at the model's sample rate.
        decoder: ``"matmul"`` (the filterbank decoder as an integer MatMul plus overlap-add) or
            ``"conv"`` (ConvTranspose, which onnxruntime runs in float).
        staged_norm_means: take each gLN mean one axis at a time (accurate on long inputs, slower in
            onnxruntime; see :func:`~fqss_plugin.export.view.export_view`).
        integer_softmax: let onnxruntime fuse the attention softmax into ``QLinearSoftmax`` (slower on its
            CPU provider, see :func:`~fqss_plugin.export.passes.keep_softmax_float`; for runtimes whose
            integer softmax pays off).
        deploy: run the deploy passes (int8 initializers, int32 biases, LeakyRelu, requantization).
    """
    sample_rate = sample_rate or _sample_rate(model)
    view = export_view(model, decoder=decoder, staged_norm_means=staged_norm_means)
    if example_input is None:
        example_input = 0.1 * torch.randn(1, int(sample_rate or 8000), generator=torch.Generator().manual_seed(0))
    example_input = example_input.detach().float().cpu()
    example_input = example_input[None] if example_input.dim() == 1 else example_input
    if example_input.dim() != 2:
        raise ExportError(f"example_input must be [batch, time] or [time], got shape {tuple(example_input.shape)}")
    calls, out = quantizer_calls(view, example_input)
    n_src = out.shape[1]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(view, (example_input,), buffer, dynamo=False, opset_version=opset,
                              input_names=["mixture"], output_names=["sources"],
                              dynamic_axes={"mixture": {0: "batch", 1: "time"}, "sources": {0: "batch", 2: "time"}})
        except Exception as error:  # noqa: BLE001 - the exporter raises many types; say which part failed
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
    onnx_model = onnx.load_from_string(buffer.getvalue())
    expand_lstm_recurrences(onnx_model)
    notes = []
    tagged = _tag_activation_quantizers(onnx_model, calls)
    if tagged == 0:
        notes.append("activation QuantizeLinear nodes could not be matched to quantizer modules: "
                     "no per-quantizer parity report for this file")
    changes = passes.deploy(onnx_model, integer_softmax=integer_softmax) if deploy else {}
    settings = {"decoder": decoder, "staged_norm_means": staged_norm_means}
    info = {"fqss_export": json.dumps(settings), "n_src": str(n_src), "producer": "fqss_plugin.export",
            "input": "mixture float32 [batch, time], raw waveform (any length)",
            "output": "sources float32 [batch, n_src, time]", "integer_softmax": str(integer_softmax), **{k: str(v) for k, v in (metadata or {}).items()}}
    if sample_rate:
        info["sample_rate"] = str(int(sample_rate))
    onnx.helper.set_model_props(onnx_model, info)
    onnx_model.producer_name = "fqss"
    onnx.checker.check_model(onnx_model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, str(path))
    return ExportResult(path, path.stat().st_size, n_src, int(sample_rate) if sample_rate else None, changes,
                        passes.tensor_bytes(onnx_model), tagged, notes)


def _sample_rate(model: nn.Module) -> int | None:
    rate = getattr(model, "sample_rate", None)
    return int(rate) if rate else None


def _tag_activation_quantizers(model: onnx.ModelProto, calls) -> int:
    """Name every activation QuantizeLinear ``fqss:<module>`` by matching graph order with call order.

    Activation Q nodes are the ones whose input is not a constant; they appear in the order of the
    quantizer calls, minus the calls whose result the exporter removed as unused (e.g. the last
    residual sum of a TCN). Each node is matched to the next call with the same step and zero point;
    if some node finds none, nothing is tagged.
    """
    graph = passes.Graph(model)
    nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and graph.const(n.input[0]) is None]
    names, k = [], 0
    for node in nodes:
        scale, zero_point = graph.const(node.input[1]), graph.const(node.input[2])
        if scale is None or zero_point is None or scale.size != 1:
            return 0
        key = (float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]))
        while k < len(calls) and (calls[k].scale, calls[k].zero_point) != key:
            k += 1
        if k == len(calls):
            return 0
        names.append(calls[k].name)
        k += 1
    for node, name in zip(nodes, names):
        node.name = TAG + name
    return len(nodes)
