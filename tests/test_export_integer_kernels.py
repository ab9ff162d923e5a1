"""The ONNX rewrites that give onnxruntime integer kernels where it would compute in float: transposed
convolutions as polyphase convolutions, and convolutions / linear layers over 8-bit parts as ConvInteger /
MatMulInteger. Each is checked against onnxruntime running the graph as it was, node by node (no graph
optimizations, which could fuse the original into other kernels)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fqss_plugin.export.integer_kernels import integer_kernels
from fqss_plugin.export.transposed_convs import polyphase_weight, transposed_convs


def graph_model(nodes, inits, x_shape) -> onnx.ModelProto:
    x_step, x_zero = np.array(0.05, np.float32), np.array(128, np.uint8)
    inits = [numpy_helper.from_array(a, n) for n, a in {**inits, "xs": x_step, "xz": x_zero}.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]), *nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def rewritten(model: onnx.ModelProto, *passes) -> tuple[onnx.ModelProto, list[int]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, [p(copy) for p in passes]


def conv_transpose(c_in, c_out, kernel, strides, per_channel, rng) -> tuple[list, dict]:
    inits = {"wq": rng.integers(-64, 64, (c_in, c_out, *kernel)).astype(np.int8),
             "ws": (rng.random(c_out) * 0.01 + 0.001).astype(np.float32) if per_channel else np.array(0.01, np.float32),
             "b": rng.standard_normal(c_out).astype(np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1),
             helper.make_node("ConvTranspose", ["xd", "w", "b"], ["y"], kernel_shape=kernel, strides=strides)]
    return nodes, inits


@pytest.mark.parametrize("c_in, c_out, kernel, strides, x_shape", [
    (3, 5, [8], [4], [2, 3, 11]),                 # HTDemucs' time decoder
    (3, 5, [8, 1], [4, 1], [2, 3, 7, 5]),         # its frequency decoder: strided axis not the last
    (2, 4, [3, 6], [1, 3], [1, 2, 4, 6]),         # strided axis last, a wider kernel on the other
    (4, 2, [5], [1], [1, 4, 9]),                  # stride 1
    (16, 1, [16], [8], [1, 16, 20]),              # Asteroid's filterbank decoder
])
@pytest.mark.parametrize("per_channel", [True, False])
def test_transposed_convs_become_integer_convs_with_the_same_output(c_in, c_out, kernel, strides, x_shape,
                                                                     per_channel):
    rng = np.random.default_rng(sum(kernel) + c_in)
    model = graph_model(*conv_transpose(c_in, c_out, kernel, strides, per_channel, rng), x_shape)
    x = rng.standard_normal(x_shape).astype(np.float32) * 3
    reference = run(model, x, optimize=False)
    polyphase, changed = rewritten(model, transposed_convs)
    assert changed == [1] and "ConvTranspose" not in {n.op_type for n in polyphase.graph.node}
    out = run(polyphase, x)
    assert out.shape == reference.shape and np.allclose(out, reference, atol=1e-5)
    integer, changed = rewritten(polyphase, integer_kernels)
    assert changed == [1] and [n.op_type for n in integer.graph.node].count("ConvInteger") == 1
    assert np.allclose(run(integer, x), reference, atol=1e-5)


def test_polyphase_weight_reindexes_the_codes():
    codes = np.arange(2 * 3 * 8, dtype=np.int8).reshape(2, 3, 8)        # (C_in, C_out, K), stride 4: m = 2
    w = polyphase_weight(codes, axis=0, stride=4)
    assert w.shape == (12, 2, 2) and sorted(w.ravel().tolist()) == sorted(codes.ravel().tolist())
    r, o, i = 3, 1, 0                                                   # W'[(r, o), i, j] = W[i, o, (m-1-j)s + r]
    assert [w[r * 3 + o, i, j] for j in range(2)] == [codes[i, o, 4 + r], codes[i, o, r]]


def test_unhandled_transposed_convs_are_left_as_they_are():
    rng = np.random.default_rng(0)
    nodes, inits = conv_transpose(2, 3, [6], [4], True, rng)            # kernel not a multiple of the stride
    model = graph_model(nodes, inits, [1, 2, 9])
    _, changed = rewritten(model, transposed_convs)
    nodes[1] = helper.make_node("ConvTranspose", ["xd", "w", "b"], ["y"], kernel_shape=[8], strides=[4], pads=[1, 1])
    inits["wq"] = rng.integers(-64, 64, (2, 3, 8)).astype(np.int8)
    _, padded = rewritten(graph_model(nodes, inits, [1, 2, 9]), transposed_convs)
    assert changed == padded == [0]


@pytest.mark.parametrize("form", ["matmul_add", "gemm_transb", "gemm", "two_parts"])
def test_linear_layers_with_a_bias_run_as_matmul_integer(form):
    """``DQ -> MatMul -> Add(bias)`` and a Gemm with a float bias run in float in onnxruntime (it fuses MatMul +
    Add into Gemm); rewritten, one MatMulInteger per 8-bit part, the same output."""
    rng = np.random.default_rng(1)
    k, n = 6, 5
    codes = rng.integers(-64, 64, (n, k) if form == "gemm_transb" else (k, n)).astype(np.int8)
    inits = {"wq": codes, "ws": (rng.random(n) * 0.01 + 0.001).astype(np.float32),
             "b": rng.standard_normal(n).astype(np.float32)}
    axis = 0 if form == "gemm_transb" else 1
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=axis)]
    source = "xd"
    if form == "two_parts":                     # x = DQ(q1) + 0.5 DQ(q2), as a SplitActivationQuantizer writes it
        inits.update(half=np.array(0.5, np.float32), rs=np.array(0.01, np.float32), rz=np.array(128, np.uint8))
        nodes += [helper.make_node("QuantizeLinear", ["x", "rs", "rz"], ["rq"]),
                  helper.make_node("DequantizeLinear", ["rq", "rs", "rz"], ["rd"]),
                  helper.make_node("Mul", ["rd", "half"], ["rh"]), helper.make_node("Add", ["xd", "rh"], ["sum"])]
        source = "sum"
    if form.startswith("gemm"):
        nodes.append(helper.make_node("Gemm", [source, "w", "b"], ["y"], transB=int(form == "gemm_transb")))
    else:
        nodes += [helper.make_node("MatMul", [source, "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    x_shape = [7, k] if form.startswith("gemm") else [2, 7, k]
    model = graph_model(nodes, inits, x_shape)
    x = rng.standard_normal(x_shape).astype(np.float32)
    reference = run(model, x, optimize=False)
    integer, changed = rewritten(model, integer_kernels)
    ops = [node.op_type for node in integer.graph.node]
    assert changed == [1] and not {"MatMul", "Gemm"} & set(ops)
    assert ops.count("MatMulInteger") == (2 if form == "two_parts" else 1)
    assert np.allclose(run(integer, x), reference, atol=1e-5)


def test_matmuls_that_onnxruntime_runs_in_integer_are_left_alone():
    """``DQ -> MatMul`` without a bias (onnxruntime's MatMulIntegerToFloat) and ``DQ -> MatMul -> Q``
    (QLinearMatMul) stay as they are."""
    rng = np.random.default_rng(2)
    inits = {"wq": rng.integers(-64, 64, (4, 3)).astype(np.int8), "ws": np.full(3, 0.01, np.float32),
             "ys": np.array(0.1, np.float32), "yz": np.array(128, np.uint8)}
    dq = helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1)
    plain = graph_model([dq, helper.make_node("MatMul", ["xd", "w"], ["y"])], inits, [2, 4])
    quantized = graph_model([dq, helper.make_node("MatMul", ["xd", "w"], ["mm"]),
                             helper.make_node("QuantizeLinear", ["mm", "ys", "yz"], ["yq"]),
                             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])], inits, [2, 4])
    assert rewritten(plain, integer_kernels)[1] == rewritten(quantized, integer_kernels)[1] == [0]
