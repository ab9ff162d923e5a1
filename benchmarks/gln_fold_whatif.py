"""What would folding the global layer norms into the next convolutions buy in onnxruntime? (#7, timing only)

The int8 hub-size ConvTasNet spends most of its time in the float gLN islands (BENCHMARKS.md, "Int8 runtime,
hub-size ConvTasNet"). The rewrite proposed for them: keep only the per-run statistics in float and let the
consumer convolutions dequantize the norm's *input* codes with a per-run step ``s / sigma`` and zero point
``round(mean / s + z)`` (QLinearConv accepts both as computed tensors, and its bias as a per-run int32
tensor), the norm's affine folded into the convolution's weights. That is a different quantized model (the
norm's output quantizer disappears, the affine is quantized with the weights), so before building its QAT
side this script measures its best case: the rewrite applied by graph surgery to the exported int8 file
(each block norm's island replaced; values are not checked, only the time is), and the same with the
statistics taken on every ``--stride``-th frame only.

    python benchmarks/gln_fold_whatif.py --repeats 20
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.int8_runtime import (calibrated_fqss, dataset, export_float, hub_stand_in,  # noqa: E402
                                     profile_by_op, profile_shares, time_interleaved)
from fqss_plugin.export.cpu import describe_cpu  # noqa: E402
from benchmarks.report import command_line, write_section  # noqa: E402


def fold_norms_into_convs(model: onnx.ModelProto, stats_stride: int = 1) -> int:
    """Replace every gLN island ``DQ -> mean/var -> affine -> Q -> DQ -> Conv -> Q`` whose consumers are all
    convolutions by ``mean/var of the DQ'd input codes -> QLinearConv(codes, s/sigma, round(mean/s + z))``.
    Returns the number of norms rewritten. Timing only: the weights are not refolded."""
    from fqss_plugin.export import passes
    g = model.graph
    graph = passes.Graph(model)
    eps = graph.add_init(np.array(1e-8, np.float32), "fold_eps")
    slice_args = [graph.add_init(np.array(v, np.int64), f"fold_slice{k}") for k, v in
                  enumerate(([0], [2 ** 62], [2], [stats_stride]))]
    added, replaced, folded = [], set(), 0
    for mean_node in [n for n in g.node if n.op_type == "ReduceMean"]:
        dq = graph.producer.get(mean_node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or graph.const(dq.input[0]) is not None:
            continue
        subs = [c for c in graph.consumers[mean_node.input[0]] if c.op_type == "Sub" and c.input[1] == mean_node.output[0]]
        if not subs:
            continue                                            # the island's second mean
        d = subs[0].output[0]
        scale_mul = next(c for c in graph.consumers[d] if c.op_type == "Mul" and c.input[0] != c.input[1])
        quantize = graph.consumers[graph.consumers[scale_mul.output[0]][0].output[0]][0]
        convs = [(c, graph.consumers[c.output[0]][0]) for dq_out in graph.consumers[quantize.output[0]]
                 for c in graph.consumers[dq_out.output[0]]]
        if quantize.op_type != "QuantizeLinear" or not all(c.op_type == "Conv" and q.op_type == "QuantizeLinear"
                                                           for c, q in convs):
            continue
        codes, step, zero = dq.input
        k = folded
        x = dq.output[0]
        if stats_stride > 1:
            added += [helper.make_node("Slice", [codes] + slice_args, [f"fold{k}_sl"]),
                      helper.make_node("DequantizeLinear", [f"fold{k}_sl", step, zero], [f"fold{k}_x"])]
            x = f"fold{k}_x"
        added += [helper.make_node("ReduceMean", [x], [f"fold{k}_m"], keepdims=0),
                  helper.make_node("Mul", [x, x], [f"fold{k}_x2"]),
                  helper.make_node("ReduceMean", [f"fold{k}_x2"], [f"fold{k}_e2"], keepdims=0),
                  helper.make_node("Mul", [f"fold{k}_m", f"fold{k}_m"], [f"fold{k}_mm"]),
                  helper.make_node("Sub", [f"fold{k}_e2", f"fold{k}_mm"], [f"fold{k}_v"]),
                  helper.make_node("Add", [f"fold{k}_v", eps], [f"fold{k}_ve"]),
                  helper.make_node("Sqrt", [f"fold{k}_ve"], [f"fold{k}_sd"]),
                  helper.make_node("Div", [step, f"fold{k}_sd"], [f"fold{k}_xs"]),
                  helper.make_node("Div", [f"fold{k}_m", step], [f"fold{k}_mz"]),
                  helper.make_node("Round", [f"fold{k}_mz"], [f"fold{k}_mr"]),
                  helper.make_node("Cast", [f"fold{k}_mr"], [f"fold{k}_zp"], to=TensorProto.UINT8)]
        for j, (conv, out_q) in enumerate(convs):
            weight_dq = graph.producer[conv.input[1]]
            weight = graph.const(weight_dq.input[0])
            inputs = [codes, f"fold{k}_xs", f"fold{k}_zp", weight_dq.input[0], weight_dq.input[1],
                      graph.add_init(np.zeros(weight.shape[0], np.int8), f"fold{k}_{j}_wz"), out_q.input[1], out_q.input[2]]
            if len(conv.input) > 2:                              # int32 bias on the per-run step s_x * s_w
                bias = graph.producer[conv.input[2]].output[0]
                added += [helper.make_node("Mul", [f"fold{k}_xs", weight_dq.input[1]], [f"fold{k}_{j}_bs"]),
                          helper.make_node("Div", [bias, f"fold{k}_{j}_bs"], [f"fold{k}_{j}_bf"]),
                          helper.make_node("Round", [f"fold{k}_{j}_bf"], [f"fold{k}_{j}_br"]),
                          helper.make_node("Cast", [f"fold{k}_{j}_br"], [f"fold{k}_{j}_b"], to=TensorProto.INT32)]
                inputs.append(f"fold{k}_{j}_b")
            attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
            added.append(helper.make_node("QLinearConv", inputs, [out_q.output[0]], **attrs))
            replaced.add(out_q.output[0])
        folded += 1
    kept = [n for n in g.node if n.output[0] not in replaced]
    del g.node[:]
    g.node.extend(_topological(kept + added, {i.name for i in g.input} | {t.name for t in g.initializer}))
    passes.remove_dead(model)
    return folded


def _topological(nodes: list, available: set[str]) -> list:
    """``nodes`` in an order where every input is produced (or given) before it is read."""
    ordered, pending = [], nodes
    while pending:
        rest = []
        for node in pending:
            if all(i == "" or i in available for i in node.input):
                ordered.append(node)
                available |= set(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph surgery left an unresolved input: {list(rest[0].input)}")
        pending = rest
    return ordered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--stride", type=int, default=4, help="statistics on every k-th frame (the second variant)")
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--machine", default="2 shared cores, other jobs may have run")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import onnxruntime as ort
    from fqss_plugin.export import to_onnx
    from fqss_plugin.export.runtime import session_options

    torch.set_num_threads(1)
    teacher = hub_stand_in()
    model = calibrated_fqss(teacher, args.calib_steps)
    mixture = dataset("test", None)[0][0][None, :32000].numpy()
    labels = {"fp32": "onnxruntime fp32", "int8": "int8, fqss export (as shipped)",
              "fold": "int8, norms folded into the convs (surgery)",
              "fold_stride": f"int8, folded, statistics on every {args.stride}th frame (surgery)"}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {key: Path(tmp) / f"{key}.onnx" for key in labels}
        export_float(teacher, paths["fp32"])
        to_onnx(model, paths["int8"])
        folded = {}
        for key, stride in (("fold", 1), ("fold_stride", args.stride)):
            surgery = onnx.load(str(paths["int8"]))
            folded[key] = fold_norms_into_convs(surgery, stride)
            onnx.save(surgery, str(paths[key]))
        sessions = {k: ort.InferenceSession(str(p), session_options(1), providers=["CPUExecutionProvider"])
                    for k, p in paths.items()}
        latency = time_interleaved({k: (lambda s=s: s.run(None, {"mixture": mixture})) for k, s in sessions.items()},
                                   args.repeats)
        profiles = {k: profile_by_op(paths[k], mixture) for k in ("int8", "fold")}
    rows = ["| graph | latency 1 thread (ms) | vs ORT fp32 |", "|---|---|---|"]
    rows += [f"| {label} | {latency[k]:.1f} | {latency['fp32'] / latency[k]:.2f}x |" for k, label in labels.items()]
    top = lambda by_op: ", ".join(f"{op} {ms:.1f}" for op, ms in by_op.items() if ms >= 2)
    shares = {k: profile_shares(p) for k, p in profiles.items()}
    body = f"""Command: `{command_line()}`

The hub-size ConvTasNet of the section above (`hub_stand_in`, {args.calib_steps} calibration steps), exported by
`to_onnx`; then {folded['fold']} of its {folded['fold'] + 1} norms (all but the first, which reads the encoder output's two
8-bit parts) rewritten by graph surgery: statistics of the dequantized input codes only (a mean and a mean of
squares), and the consumer convolutions as QLinearConv with the per-run step, zero point and int32 bias. This
is the best case of a QAT-time fold of gLN into the next convolution (the weights are not refolded, values are
not checked). One 4 s mixture, 1 thread, median of {args.repeats} interleaved runs after 3 warm-ups;
onnxruntime {ort.__version__}. Machine: {args.machine}; CPU: {describe_cpu()}.

{chr(10).join(rows)}

By op type (profiler, ms per run): shipped int8: {top(profiles['int8'])};
folded: {top(profiles['fold'])}.
Grouped: shipped {', '.join(f'{k} {v:.0f}' for k, v in shares['int8'].items())};
folded {', '.join(f'{k} {v:.0f}' for k, v in shares['fold'].items())}.

Reading: the fold removes {shares['int8']['float compute'] - shares['fold']['float compute']:.0f} ms of float compute, but the convolutions with a
per-run input step take {profiles['fold'].get('QLinearConv', 0) - profiles['int8'].get('QLinearConv', 0):+.0f} ms and onnxruntime adds layout Transposes
({profiles['fold'].get('Transpose', 0) - profiles['int8'].get('Transpose', 0):+.0f} ms) where the codes feed both the float statistics and the
convolutions, and the statistics themselves (DequantizeLinear, Mul, ReduceMean) remain. So the fold is not
worth its change of the quantized model in onnxruntime's CPU provider, and even statistics on a quarter of
the frames stay short of 2.5x.
"""
    print(body)
    if not args.no_write:
        write_section("gLN fold what-if (hub-size ConvTasNet, timing only)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
