"""Convolutions of split 8-bit tensors as integer kernels (``ConvInteger``), where onnxruntime would run float.

onnxruntime fuses ``DQ -> Conv -> Q`` into QLinearConv only when the Conv reads one DequantizeLinear and its
output goes to one QuantizeLinear. A tensor carried by several 8-bit tensors
(:class:`~fqss_plugin.quant.signal_io.SplitActivationQuantizer`) breaks both: the Conv reads their weighted
sum ``x = Σ_k g_k·DQ(q_k)``, and a Conv whose output is itself split feeds the residual's ``Sub`` as well
as a ``Q``. onnxruntime then dequantizes and convolves in float. By linearity,

.. math::  \\mathrm{conv}(x; W) + b = \\sum_k \\big(g_k\\, s_k\\, s_{w,c}\\big)\\,
           \\mathrm{ConvInteger}(q_k - z_k;\\ W_q)_c + b_c

with ``s_k, z_k`` the step and zero point of part ``k``, ``W = s_{w,c} W_q`` per output channel: one integer
convolution (uint8 x int8, int32 accumulation) per part, then a per-channel float scale, as an integer
engine computes it. :func:`integer_convs` rewrites every such Conv (the parts may reach it through
Reshape/Transpose/Squeeze/Unsqueeze); Convs that onnxruntime fuses already are left alone. The int8 weight
codes stay as they are; :func:`fqss_plugin.export.saturation.uint8_weights` makes them uint8 where a CPU
without VNNI could saturate.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .passes import Graph, remove_dead

MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze"}
"""Ops between the parts and the Conv that apply to the uint8 codes as well (no padding value involved)."""


def integer_convs(model: onnx.ModelProto) -> int:
    """Rewrite every float Conv over 8-bit parts (see the module docstring); returns how many."""
    graph, done = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type != "Conv" or _fused_by_onnxruntime(graph, node):
            continue
        weight = _weight_codes(graph, node.input[1])
        found = _parts(graph, node.input[0])
        if weight is None or found is None:
            continue
        moves, parts = found
        _rewrite(graph, node, weight, moves, parts)
        done += 1
    if done:
        remove_dead(model)
    return done


def _fused_by_onnxruntime(graph: Graph, conv: onnx.NodeProto) -> bool:
    """``DQ -> Conv -> Q`` (the Conv's only consumer): onnxruntime's QLinearConv."""
    source = graph.producer.get(conv.input[0])
    consumers = graph.consumers.get(conv.output[0], [])
    return (source is not None and source.op_type == "DequantizeLinear" and len(consumers) == 1
            and consumers[0].op_type == "QuantizeLinear" and conv.output[0] not in graph.outputs)


def _weight_codes(graph: Graph, name: str) -> tuple[str, np.ndarray] | None:
    """``(codes initializer, per-output-channel steps)`` of a weight ``DQ(int8 constant)`` with zero point 0."""
    dq = graph.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in graph.init:
        return None
    codes, scale = graph.const(dq.input[0]), graph.const(dq.input[1])
    zero = graph.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if codes.dtype != np.int8 or scale is None or (zero is not None and np.any(zero)):
        return None
    scale = np.broadcast_to(scale.reshape(-1), (codes.shape[0],)) if scale.size in (1, codes.shape[0]) else None
    return None if scale is None else (dq.input[0], scale.astype(np.float32))


def _parts(graph: Graph, name: str) -> tuple[list[onnx.NodeProto], list[tuple[float, onnx.NodeProto]]] | None:
    """The shape moves from the sum to the Conv (top first) and the sum's parts ``[(g_k, DQ_k)]``, else None."""
    moves, node = [], graph.producer.get(name)
    while node is not None and node.op_type in MOVES and all(graph.const(i) is not None for i in node.input[1:] if i):
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
        if not codes_are_activations or scale is None or scale.size != 1 or zero is None or zero.dtype != np.uint8:
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


def _rewrite(graph: Graph, conv: onnx.NodeProto, weight: tuple[str, np.ndarray], moves: list[onnx.NodeProto],
             parts: list[tuple[float, onnx.NodeProto]]) -> None:
    codes_name, weight_scale = weight
    rank = len(graph.const(codes_name).shape)
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    new, terms = [], []
    for k, (gain, dq) in enumerate(parts):
        codes = dq.input[0]
        for move in moves:                             # the same moves on the uint8 codes
            moved = graph.unique(f"{conv.output[0]}_part{k}_{move.op_type}")
            new.append(helper.make_node(move.op_type, [codes, *move.input[1:]], [moved], name=moved,
                                        **{a.name: helper.get_attribute_value(a) for a in move.attribute}))
            codes = moved
        accumulator = graph.unique(f"{conv.output[0]}_part{k}_int32")
        new.append(helper.make_node("ConvInteger", [codes, codes_name, dq.input[2]], [accumulator], name=accumulator,
                                    **attributes))
        as_float = graph.unique(f"{conv.output[0]}_part{k}_float")
        new.append(helper.make_node("Cast", [accumulator], [as_float], name=as_float, to=TensorProto.FLOAT))
        step = float(graph.const(dq.input[1]).reshape(-1)[0])
        channel_scale = (gain * step * weight_scale).astype(np.float32).reshape((1, -1) + (1,) * (rank - 2))
        scaled = graph.unique(f"{conv.output[0]}_part{k}")
        new.append(helper.make_node("Mul", [as_float, graph.add_init(channel_scale, scaled + "_scale")], [scaled],
                                    name=scaled))
        terms.append(scaled)
    total = terms[0]
    for k, term in enumerate(terms[1:], start=1):
        summed = graph.unique(f"{conv.output[0]}_sum{k}")
        new.append(helper.make_node("Add", [total, term], [summed], name=summed))
        total = summed
    if len(conv.input) > 2 and conv.input[2]:
        shape = graph.add_init(np.array([1, -1] + [1] * (rank - 2), np.int64), conv.output[0] + "_bias_shape")
        bias = graph.unique(conv.output[0] + "_bias")
        new.append(helper.make_node("Reshape", [conv.input[2], shape], [bias], name=bias))
        with_bias = graph.unique(conv.output[0] + "_biased")
        new.append(helper.make_node("Add", [total, bias], [with_bias], name=with_bias))
        total = with_bias
    new[-1].output[0] = conv.output[0]                 # the Conv's consumers read the new sum, unchanged
    index = list(graph.g.node).index(conv)
    del graph.g.node[index]
    for offset, node in enumerate(new):                # the container holds copies: index them from it
        graph.g.node.insert(index + offset, node)
        graph.producer.update({o: graph.g.node[index + offset] for o in node.output})
