"""``to_onnx``: freeze, export with the TorchScript exporter, run the deploy passes, check."""
from __future__ import annotations

import io
import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from ..atomic import atomic_path
from . import passes, saturation
from .integer_kernels import integer_kernels
from .recurrent import expand_lstm_recurrences
from .transposed_convs import transposed_convs
from .view import ExportError, export_view, quantizer_calls

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
            target: str = saturation.PORTABLE, deploy: bool = True, sample_rate: int | None = None, metadata: dict | None = None) -> ExportResult:
    """Export a trained fqss separator to an int8 ONNX QDQ model that onnxruntime runs in integer.

    Steps: :func:`~fqss_plugin.freeze` on a copy (the model is not modified), the export view
    (:mod:`fqss_plugin.export.view`), ``torch.onnx.export(..., dynamo=False)`` with a dynamic batch
    and time axis, the deploy passes (:mod:`fqss_plugin.export.passes`) and ``onnx.checker``.

    The graph takes the raw waveform ``mixture: float32 [batch, time]`` (any length) and returns
    ``sources: float32 [batch, n_src, time]``; the FQSS input split (peak normalisation, floor-based
    8-bit split) and the output recombination run inside the graph. A multichannel model (``audio_channels``
    > 1, e.g. ``StereoConvTasNet``) takes ``[batch, channels, time]`` and returns ``[batch, n_src, channels,
    time]``; its source names (``model.sources``) and the normalisation its input expects
    (``model.input_normalization``) go into the metadata, where :class:`~fqss_plugin.export.OrtSeparator` reads them.

    Args:
        model: a model prepared with :func:`fqss_plugin.prepare` whose quantizers have seen data.
        path: where to write the ``.onnx`` file.
        example_input: a ``[batch, time]`` (or ``[time]``; multichannel: ``[batch, channels, time]``) mixture
            used for tracing; by default one second of noise at the model's sample rate.
        decoder: ``"matmul"`` (the filterbank decoder as an integer MatMul plus overlap-add) or
            ``"conv"`` (ConvTranspose, which onnxruntime runs in float).
        staged_norm_means: take each gLN mean one axis at a time (accurate on long inputs, slower in
            onnxruntime; see :func:`~fqss_plugin.export.view.export_view`).
        integer_softmax: let onnxruntime fuse the attention softmax into ``QLinearSoftmax`` (slower on its
            CPU provider, see :func:`~fqss_plugin.export.passes.keep_softmax_float`; for runtimes whose
            integer softmax pays off).
        target: ``"portable"`` (default): the file gives the same output on every CPU. Its integer
            Conv/MatMul ops are checked against the u8 x s8 int16 saturation of x86 CPUs without VNNI
            (:mod:`~fqss_plugin.export.saturation`); the weights of an op that breaks the bound (8-bit
            weights; a model trained with ``QuantConfig(weight_bits=7)`` has none) are stored as uint8,
            which the kernels multiply without saturating, more slowly. ``"vnni"``: int8 weights as
            trained, for CPUs with VNNI or int32 dot products (ARM); the file records it and
            :class:`~fqss_plugin.export.OrtSeparator` refuses to run it on a CPU that would saturate.
        deploy: run the deploy passes (int8 initializers, int32 biases, LeakyRelu, requantization).
    """
    if target not in saturation.TARGETS:
        raise ExportError(f"target must be one of {', '.join(saturation.TARGETS)}, got {target!r}")
    if isinstance(model, nn.Module):
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ExportError(f"{name} holds NaN/Inf values (a diverged training?); an int8 file would hide them "
                                  "as integers")
    from .registry import exporter_for
    exporter = exporter_for(model)
    if exporter is not None:                                # a toolkit's own graph (e.g. HTDemucs without STFT)
        return exporter(model, path, target=target, integer_softmax=integer_softmax, deploy=deploy, metadata=metadata)
    sample_rate = sample_rate or _sample_rate(model)
    channels = int(getattr(model, "audio_channels", 1) or 1)
    view = export_view(model, decoder=decoder, staged_norm_means=staged_norm_means)
    if example_input is None:
        shape = (1, int(sample_rate or 8000)) if channels == 1 else (1, channels, int(sample_rate or 8000))
        example_input = 0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    example_input = example_input.detach().float().cpu()
    rank = 2 if channels == 1 else 3                        # batched
    example_input = example_input[None] if example_input.dim() == rank - 1 else example_input
    expected = "[batch, time] or [time]" if channels == 1 else f"[batch, {channels}, time] or [{channels}, time]"
    if example_input.dim() != rank or (channels > 1 and example_input.shape[1] != channels):
        raise ExportError(f"example_input must be {expected}, got shape {tuple(example_input.shape)}")
    calls, out = quantizer_calls(view, example_input)
    if not torch.isfinite(out).all():
        raise ExportError(f"{type(model).__name__} returns NaN/Inf on the example input: its weights or quantizer "
                          "steps hold non-finite values (a diverged training?); an int8 file would hide them")
    n_src = out.shape[1]
    time_axis = example_input.dim() - 1
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(view, (example_input,), buffer, dynamo=False, opset_version=opset,
                              input_names=["mixture"], output_names=["sources"],
                              dynamic_axes={"mixture": {0: "batch", time_axis: "time"},
                                            "sources": {0: "batch", time_axis + 1: "time"}})
        except Exception as error:  # noqa: BLE001 - the exporter raises many types; say which part failed
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
    onnx_model = onnx.load_from_string(buffer.getvalue())
    expand_lstm_recurrences(onnx_model)
    passes.fold_constant_elementwise(onnx_model)          # narrow weight codes' clamps: weights are constants again
    notes = []
    tagged = _tag_activation_quantizers(onnx_model, calls)
    if tagged == 0:
        notes.append("activation QuantizeLinear nodes could not be matched to quantizer modules: "
                     "no per-quantizer parity report for this file")
    settings = {"decoder": decoder, "staged_norm_means": staged_norm_means}
    info = {"fqss_export": json.dumps(settings), "n_src": str(n_src), "producer": "fqss_plugin.export",
            "input": "mixture float32 [batch, time], raw waveform (any length)" if channels == 1 else
                     f"mixture float32 [batch, {channels}, time] (any length)",
            "output": "sources float32 [batch, n_src, time]" if channels == 1 else
                      f"sources float32 [batch, n_src, {channels}, time]",
            "audio_channels": str(channels), "integer_softmax": str(integer_softmax),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    if sample_rate:
        info["sample_rate"] = str(int(sample_rate))
    if getattr(model, "sources", None):                    # named sources (music stems) keep their order
        info["sources"] = ",".join(model.sources)
    if getattr(model, "input_normalization", None):
        info["input_normalization"] = model.input_normalization
    path = Path(path)
    changes = write_int8_model(onnx_model, path, info, notes, target=target, integer_softmax=integer_softmax,
                               deploy=deploy)
    return ExportResult(path, path.stat().st_size, n_src, int(sample_rate) if sample_rate else None, changes,
                        passes.tensor_bytes(onnx_model), tagged, notes)


def write_int8_model(onnx_model: onnx.ModelProto, path: Path, info: dict[str, str], notes: list[str], *,
                     target: str = saturation.PORTABLE, integer_softmax: bool = False, deploy: bool = True) -> dict:
    """The last steps of every int8 export: the deploy passes, the portability check (:func:`_portability`),
    the metadata ``info`` (plus ``int8_target``), ``onnx.checker`` and an atomic write to ``path`` (a kill
    during the write leaves an earlier file whole). Returns what the passes changed."""
    changes = passes.deploy(onnx_model, integer_softmax=integer_softmax) if deploy else {}
    if deploy:
        changes["transposed_convs"] = transposed_convs(onnx_model)
        changes["integer_kernels"] = integer_kernels(onnx_model)
    int8_target, changes["uint8_weights"] = _portability(onnx_model, target, notes)
    onnx.helper.set_model_props(onnx_model, {**info, saturation.METADATA_KEY: int8_target})
    onnx_model.producer_name = "fqss"
    onnx.checker.check_model(onnx_model, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(onnx_model, str(tmp))
    return changes


def _portability(model: onnx.ModelProto, target: str, notes: list[str]) -> tuple[str, int]:
    """The file's ``int8_target`` and how many weight tensors were made uint8 to reach it."""
    risks = saturation.saturation_risks(model)
    if not risks:
        return saturation.PORTABLE, 0
    if target == saturation.VNNI:
        notes.append(f"{len(risks)} integer ops can saturate in int16 on x86 CPUs without VNNI (first: {risks[0]}); "
                     "the file is marked int8_target=vnni and is refused on such CPUs")
        return saturation.VNNI, 0
    converted = saturation.uint8_weights(model, risks)
    passes.remove_dead(model)
    left = saturation.saturation_risks(model)
    if left:
        raise ExportError(f"the portable int8 file still has {len(left)} saturating ops after the uint8 weights "
                          f"(first: {left[0]})")
    notes.append(f"{converted} weight tensors of 8-bit codes stored as uint8 (u8 x u8, exact on every CPU, slower "
                 "than int8); train with QuantConfig(weight_bits=7) for int8 weights that are portable")
    return saturation.PORTABLE, converted


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
