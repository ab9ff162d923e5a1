"""Convolutions and linear layers over 8-bit tensors as integer kernels, where onnxruntime would run float.

onnxruntime fuses ``DQ -> Conv -> Q`` into QLinearConv (and ``DQ -> MatMul -> Q`` into QLinearMatMul) only
when the op reads one DequantizeLinear and its output goes to one QuantizeLinear. Three forms break this:
a tensor carried by several 8-bit tensors (:class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer`),
which the op reads as their weighted sum ``x = Σ_k g_k·DQ(q_k)``; an op whose output is itself split (it feeds
the residual's ``Sub`` as well as a ``Q``); and a linear layer with its float bias (``MatMul -> Add``, which
onnxruntime fuses into a float Gemm before it looks for integer kernels, or a ``Gemm`` with a float ``C``).
onnxruntime then dequantizes and computes in float. By linearity, with ``s_k, z_k`` the step and zero point of part ``k`` and
``W = s_{w,c} W_q`` per output channel ``c``,

.. math::  \mathrm{op}(x; W) + b = \sum_k \big(g_k\, s_k\, s_{w,c}\big)\,
           \mathrm{op_{int}}(q_k - z_k;\ W_q)_c + b_c

one integer kernel per part (``ConvInteger`` or ``MatMulInteger``: uint8 x int8, int32 accumulation; int8
activation codes are made uint8 first, the same values), then
a per-channel float scale, as an integer engine computes it. :func:`integer_kernels` rewrites every such Conv, MatMul
(constant weight ``B``) and Gemm (``alpha = beta = 1``, no ``transA``); the parts may reach it through
Reshape/Transpose/Squeeze/Unsqueeze. Ops that onnxruntime fuses already are left alone; so is a MatMul of
two activations. The int8 weight codes stay as they are (transposed for a ``transB`` Gemm);
:func:`fqss_plugin.export.saturation.uint8_weights` makes them uint8 where a CPU without VNNI could saturate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .passes import Graph, _attr, remove_dead

MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze"}
"""Ops between the parts and the kernel that apply to the uint8 codes as well (no padding value involved; their
other inputs, constant or computed shapes and axes, are read as they are)."""

INTEGER_OP = {"Conv": "ConvInteger", "MatMul": "MatMulInteger", "Gemm": "MatMulInteger"}


@dataclass
class Weight:
    """An op's constant weight as integer-kernel operands: ``codes`` (an int8 initializer, in the layout the
    integer op reads) and the float ``scale`` per output channel, shaped to broadcast over the op's output."""
    codes: str
    scale: np.ndarray


def integer_kernels(model: onnx.ModelProto) -> int:
    """Rewrite every float Conv/MatMul/Gemm over 8-bit parts (see the module docstring); returns how many."""
    graph, done = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type not in INTEGER_OP or _fused_by_onnxruntime(graph, node):
            continue
        found = _parts(graph, node.input[0])
        weight = _weight(graph, node) if found is not None else None
        if weight is None:
            continue
        moves, parts = found
        _rewrite(graph, node, weight, moves, parts)
        done += 1
    if done:
        remove_dead(model)
    return done


def _fused_by_onnxruntime(graph: Graph, node: onnx.NodeProto) -> bool:
    """Whether onnxruntime runs the op in integer itself: ``DQ -> Conv -> Q`` (QLinearConv), ``DQ -> MatMul -> Q``
    (QLinearMatMul), or ``DQ -> MatMul`` that no ``Add`` reads (MatMulIntegerToFloat; with a bias Add,
    onnxruntime first fuses MatMul + Add into a float Gemm). A Gemm never: onnxruntime's QGemm needs an int32 bias."""
    source = graph.producer.get(node.input[0])
    if node.op_type == "Gemm" or source is None or source.op_type != "DequantizeLinear":
        return False
    consumers = graph.consumers.get(node.output[0], [])
    quantized = (len(consumers) == 1 and consumers[0].op_type == "QuantizeLinear"
                 and node.output[0] not in graph.outputs)
    if node.op_type == "Conv":
        return quantized
    added = any(c.op_type == "Add" for c in consumers)     # a bias, constant or not yet folded (a Slice of one)
    return quantized or not added


def _weight(graph: Graph, node: onnx.NodeProto) -> Weight | None:
    """The op's weight ``DQ(int8 constant)`` (zero point 0, per tensor or per output channel), else None."""
    dq = graph.producer.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in graph.init:
        return None
    codes, scale = graph.const(dq.input[0]), graph.const(dq.input[1])
    zero = graph.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if codes.dtype != np.int8 or scale is None or (zero is not None and np.any(zero)):
        return None
    if node.op_type == "Conv":                     # (C_out, C_in, *kernel); output (B, C_out, *S)
        channel_axis, transposed = 0, False
    elif node.op_type == "Gemm":                   # B (K, N), or (N, K) with transB; output (M, N)
        if codes.ndim != 2 or _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1 or _attr(node, "beta", 1.0) != 1:
            return None
        transposed = bool(_attr(node, "transB", 0))
        channel_axis = 0 if transposed else 1
    else:                                          # MatMul: B (K, N); output (..., N)
        if codes.ndim != 2:
            return None
        channel_axis, transposed = 1, False
    channels = codes.shape[channel_axis]
    if scale.size > 1 and (scale.size != channels or _attr(dq, "axis", 1) % codes.ndim != channel_axis):
        return None
    scale = np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float32)
    name = dq.input[0]
    if transposed:
        name = graph.add_init(np.ascontiguousarray(codes.T), name + "_transposed")
    shape = (1, -1) + (1,) * (codes.ndim - 2) if node.op_type == "Conv" else (-1,)
    return Weight(name, scale.reshape(shape))


def _parts(graph: Graph, name: str) -> tuple[list[onnx.NodeProto], list[tuple[float, onnx.NodeProto]]] | None:
    """The shape moves from the sum to the op (top first) and the sum's parts ``[(g_k, DQ_k)]``, else None."""
    moves, node = [], graph.producer.get(name)
    while node is not None and node.op_type in MOVES:
        moves.insert(0, node)
        node = graph.producer.get(node.input[0])
    parts = _terms(graph, node, 1.0)
    return (moves, parts) if parts and len(parts) <= 4 else None


def _terms(graph: Graph, node: onnx.NodeProto | None, gain: float) -> list[tuple[float, onnx.NodeProto]] | None:
    """``Σ_k g_k·DQ(q_k)`` written with Add and Mul by scalar constants, as ``[(g_k, DQ_k)]``."""
    if node is None:
        return None
    if node.op_type == "DequantizeLinear":
        scale, zero = graph.const(node.input[1]), graph.const(node.input[2]) if len(node.input) > 2 else None
        codes_are_activations = node.input[0] not in graph.init and graph.const(node.input[0]) is None
        if not codes_are_activations or scale is None or scale.size != 1 or zero is None:
            return None
        if zero.dtype != np.uint8 and not (zero.dtype == np.int8 and _signed_codes_can_move(graph, node)):
            return None
        return [(gain, node)]
    if node.op_type == "Add":
        left, right = (_terms(graph, graph.producer.get(i), gain) for i in node.input)
        return left + right if left is not None and right is not None else None
    if node.op_type == "Mul":
        for k in (0, 1):
            factor = graph.const(node.input[k])
            if factor is not None and factor.size == 1:
                return _terms(graph, graph.producer.get(node.input[1 - k]), gain * float(factor.reshape(-1)[0]))
    return None


def _signed_codes_can_move(graph: Graph, dq: onnx.NodeProto) -> bool:
    """Whether the int8 codes ``dq`` reads come from a QuantizeLinear read by DequantizeLinears only."""
    q = graph.producer.get(dq.input[0])
    return (q is not None and q.op_type == "QuantizeLinear" and dq.input[0] not in graph.outputs
            and all(c.op_type == "DequantizeLinear" for c in graph.consumers.get(dq.input[0], [])))


def _as_uint8(graph: Graph, dq: onnx.NodeProto) -> None:
    """Make the int8 codes that ``dq`` reads uint8, the same values: the QuantizeLinear and its
    DequantizeLinears take the zero point ``z + 128`` as uint8 (``clamp(round(x/s) + z, -128, 127) + 128 =
    clamp(round(x/s) + z + 128, 0, 255)``). The kernels read uint8 activations."""
    zero = graph.const(dq.input[2])
    if zero.dtype == np.uint8:
        return
    codes = dq.input[0]
    unsigned = graph.add_init((zero.astype(np.int16) + 128).astype(np.uint8), codes + "_uint8_zero")
    for node in [graph.producer[codes], *graph.consumers[codes]]:
        node.input[2] = unsigned
    kept = [v for v in graph.g.value_info if v.name != codes]    # its recorded type was int8
    del graph.g.value_info[:]
    graph.g.value_info.extend(kept)


def _rewrite(graph: Graph, node: onnx.NodeProto, weight: Weight, moves: list[onnx.NodeProto],
             parts: list[tuple[float, onnx.NodeProto]]) -> None:
    integer_op = INTEGER_OP[node.op_type]
    attributes = ({a.name: helper.get_attribute_value(a) for a in node.attribute} if node.op_type == "Conv" else {})
    out = node.output[0]
    new, terms = [], []
    for k, (gain, dq) in enumerate(parts):
        _as_uint8(graph, dq)
        codes = dq.input[0]
        for move in moves:                             # the same moves on the uint8 codes
            moved = graph.unique(f"{out}_part{k}_{move.op_type}")
            new.append(helper.make_node(move.op_type, [codes, *move.input[1:]], [moved], name=moved,
                                        **{a.name: helper.get_attribute_value(a) for a in move.attribute}))
            codes = moved
        accumulator = graph.unique(f"{out}_part{k}_int32")
        new.append(helper.make_node(integer_op, [codes, weight.codes, dq.input[2]], [accumulator], name=accumulator,
                                    **attributes))
        as_float = graph.unique(f"{out}_part{k}_float")
        new.append(helper.make_node("Cast", [accumulator], [as_float], name=as_float, to=TensorProto.FLOAT))
        step = float(graph.const(dq.input[1]).reshape(-1)[0])
        scaled = graph.unique(f"{out}_part{k}")
        scale = graph.add_init((gain * step * weight.scale).astype(np.float32), scaled + "_scale")
        new.append(helper.make_node("Mul", [as_float, scale], [scaled], name=scaled))
        terms.append(scaled)
    total = terms[0]
    for k, term in enumerate(terms[1:], start=1):
        summed = graph.unique(f"{out}_sum{k}")
        new.append(helper.make_node("Add", [total, term], [summed], name=summed))
        total = summed
    if len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
        if node.op_type == "Conv":                     # (C_out,) -> (1, C_out, 1, ...)
            shape = graph.add_init(np.array(weight.scale.shape, np.int64), out + "_bias_shape")
            bias = graph.unique(out + "_bias")
            new.append(helper.make_node("Reshape", [node.input[2], shape], [bias], name=bias))
        with_bias = graph.unique(out + "_biased")
        new.append(helper.make_node("Add", [total, bias], [with_bias], name=with_bias))
        total = with_bias
    new[-1].output[0] = out                            # the op's consumers read the new sum, unchanged
    index = list(graph.g.node).index(node)
    del graph.g.node[index]
    for offset, added in enumerate(new):               # the container holds copies: index them from it
        graph.g.node.insert(index + offset, added)
        graph.producer.update({o: graph.g.node[index + offset] for o in added.output})
