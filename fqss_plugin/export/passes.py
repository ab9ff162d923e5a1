"""ONNX deploy passes: from the exporter's fake-quant QDQ graph to a compact int8 QDQ model.

The legacy exporter writes every weight as a float initializer behind a QuantizeLinear, every
bias in float, and leaves shape ops between a DequantizeLinear and the op that consumes it.
onnxruntime fuses ``DQ -> op -> Q`` chains into integer kernels (QLinearConv, QLinearMul, ...)
only when the DQ sits right in front of the op. The passes, each numerically exact or exactly
what onnxruntime does itself:

* :func:`fold_weight_quantizers` -- ``Q(constant)`` becomes an int8 initializer (computed with
  torch's own fake-quant kernel, so the integers are the ones the torch model used);
* :func:`fold_constant_reshapes` -- ``DQ(int8 constant) -> Reshape(constant shape)`` becomes a
  DQ of the reshaped constant (per-tensor when all channel steps are equal);
* :func:`fold_constant_transposes` -- ``DQ(int8 constant) -> Transpose/Split/Slice`` becomes DQs of the moved codes
  (``F.linear``'s transposed weight, an attention's q/k/v split), so that the MatMul sees the DQ;
* :func:`quantize_biases` -- a Conv/MatMul-feeding bias becomes int32 with step ``s_x·s_w``
  behind a DQ (the rounding integer kernels apply to a float bias anyway);
* :func:`scalar_qparams` -- ``[1]`` steps and zero points become scalars (QLinearAdd/Mul need them);
* :func:`prelu_to_leakyrelu` -- a PReLU with one slope is a LeakyRelu (which has an int8 kernel);
* :func:`requantize_before_integer_ops` -- ``DQ -> Reshape/Transpose/... -> op`` gets a copy of the
  producer's Q/DQ right in front of the op (an identity: the values are on that grid);
* :func:`drop_zero_points` -- all-zero zero points of weight/bias DQs (the default) are not stored;
* :func:`remove_identities`, :func:`remove_dead` -- Identity nodes, unused nodes and initializers;
* :func:`keep_softmax_float` -- Softmax stays a float kernel (faster than onnxruntime's QLinearSoftmax);
* :data:`COMPACT` -- the same graph in fewer bytes: Constant nodes as initializers, duplicate initializers
  merged, default Conv attributes dropped, shortest tensor names (the exporter's scope names weigh more than
  a small model's weights).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

SHAPE_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Split", "Gather",
             "Pad", "Tile", "Identity"}
"""Ops that move values without changing them (Pad: with zeros, on every grid)."""

INTEGER_CAPABLE = {"Conv": (0, 1), "MatMul": (0, 1), "Gemm": (0, 1), "Mul": (0, 1), "Add": (0, 1), "Sigmoid": (0,),
                   "LeakyRelu": (0,), "Concat": None, "AveragePool": (0,), "Softmax": (0,)}
"""Ops onnxruntime's CPU provider runs in int8 when DQ feeds the listed inputs (None: all)."""


class Graph:
    """Index of an ONNX graph: producers, consumers, constants."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.refresh()

    def refresh(self) -> None:
        self.init = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.init:
            return numpy_helper.to_array(self.init[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":
            return self.const(node.input[0])
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def add_init(self, array: np.ndarray, name: str) -> str:
        name = self.unique(name)
        self.g.initializer.append(numpy_helper.from_array(array, name))
        self.init[name] = self.g.initializer[-1]
        return name

    def unique(self, name: str) -> str:
        taken = set(self.init) | set(self.producer) | {i.name for i in self.g.input}
        base, k = name, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def replace_uses(self, old: str, new: str) -> None:
        for n in self.consumers.get(old, []):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def remove_identities(model: onnx.ModelProto) -> int:
    graph, removed = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type == "Identity" and node.output[0] not in graph.outputs:
            graph.replace_uses(node.output[0], node.input[0])
            graph.g.node.remove(node)
            removed += 1
    return removed


CONSTANT_ELEMENTWISE = {"Max": np.maximum, "Min": np.minimum, "Mul": np.multiply, "Neg": np.negative}
"""Ops on constants the TorchScript exporter leaves in the graph (its constant folding skips Max/Min): the
clamp of weights onto a code range narrower than int8 (:class:`~fqss_plugin.quant.quantizers.FrozenWeightQuantizer`)."""


def fold_constant_elementwise(model: onnx.ModelProto) -> int:
    """``Max``/``Min``/``Mul``/``Neg`` of constants -> an initializer (numpy, float32 as the kernels compute)."""
    graph, folded = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type not in CONSTANT_ELEMENTWISE:
            continue
        values = [graph.const(i) for i in node.input]
        if any(v is None for v in values):
            continue
        result = values[0]
        for value in values[1:]:
            result = CONSTANT_ELEMENTWISE[node.op_type](result, value)
        if len(values) == 1:
            result = CONSTANT_ELEMENTWISE[node.op_type](result)
        name = graph.add_init(np.asarray(result, dtype=values[0].dtype), node.output[0].split("/")[-1] + "_const")
        graph.replace_uses(node.output[0], name)       # a later fold reads the new initializer (graph.init)
        graph.g.node.remove(node)
        folded += 1
    return folded


def fold_weight_quantizers(model: onnx.ModelProto) -> int:
    """``QuantizeLinear(constant)`` -> int8/uint8 initializer (the DQ behind it stays)."""
    graph, folded = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type != "QuantizeLinear":
            continue
        x, scale = graph.const(node.input[0]), graph.const(node.input[1])
        zero_point = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if x is None or scale is None or zero_point is None:
            continue
        codes = _quantize_like_torch(x, scale, zero_point, _attr(node, "axis", 1))
        name = graph.add_init(codes, node.input[0].split("/")[-1] + "_int8")
        graph.replace_uses(node.output[0], name)
        graph.g.node.remove(node)
        folded += 1
    return folded


def _quantize_like_torch(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """The integer codes torch's fake-quant kernels put ``x`` on (so DQ gives torch's values exactly)."""
    info = np.iinfo(zero_point.dtype)
    xt, st = torch.from_numpy(np.array(x, np.float32)), torch.from_numpy(np.array(scale, np.float32))
    zt = torch.from_numpy(zero_point.astype(np.int32))
    if scale.size > 1 or scale.ndim == 1 and x.ndim > 0 and scale.size == x.shape[axis % x.ndim]:
        fq = torch.fake_quantize_per_channel_affine(xt, st.reshape(-1), zt.reshape(-1), axis % x.ndim, info.min, info.max)
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        st, zt = st.reshape(shape), zt.reshape(shape)
    else:
        fq = torch.fake_quantize_per_tensor_affine(xt, float(st.reshape(-1)[0]), int(zt.reshape(-1)[0]), info.min,
                                                   info.max)
    return (torch.round(fq / st) + zt).clamp(info.min, info.max).numpy().astype(zero_point.dtype)


def _dq_of_const(graph: Graph, name: str):
    """(DQ node, int codes, scale, zero point) if ``name`` is a DequantizeLinear of constants."""
    node = graph.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    codes, scale = graph.const(node.input[0]), graph.const(node.input[1])
    zero_point = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros_like(codes, shape=())
    if codes is None or scale is None or zero_point is None:
        return None
    return node, codes, scale, zero_point


def fold_constant_reshapes(model: onnx.ModelProto) -> int:
    """``DQ(constant codes) -> Reshape(constant)`` -> ``DQ(reshaped codes)`` when the step is one value."""
    graph, folded = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type != "Reshape":
            continue
        found, shape = _dq_of_const(graph, node.input[0]), graph.const(node.input[1])
        if found is None or shape is None:
            continue
        _, codes, scale, zero_point = found
        if np.unique(scale).size != 1 or np.unique(zero_point).size != 1 or (shape == -1).sum() > 1:
            continue
        _replace_by_dqs(graph, node, [(codes.reshape(shape), scale.reshape(-1)[:1].reshape(()),
                                       zero_point.reshape(-1)[:1].reshape(()), None)])
        folded += 1
    return folded


def _replace_by_dqs(graph: Graph, node: onnx.NodeProto, parts: list[tuple]) -> None:
    """Replace ``node`` by one DequantizeLinear per output: ``parts[k] = (codes, scale, zero point, axis or None)``
    become initializers, the k-th DQ writes ``node.output[k]`` (per-axis when ``axis`` is given)."""
    index = list(graph.g.node).index(node)
    graph.g.node.remove(node)
    for k, (codes, scale, zero_point, axis) in enumerate(parts):
        base = graph.add_init(np.ascontiguousarray(codes), node.output[k] + "_codes")
        inputs = [base, graph.add_init(scale, base + "_scale"), graph.add_init(zero_point, base + "_zero")]
        graph.g.node.insert(index + k, helper.make_node("DequantizeLinear", inputs, [node.output[k]],
                                                        **({"axis": axis} if axis is not None else {})))
    graph.refresh()


def fold_constant_transposes(model: onnx.ModelProto) -> int:
    """``DQ(constant codes) -> Transpose``, ``-> Split`` (constant sizes) and ``-> Slice`` (constant bounds, unit
    steps) -> DQs of the moved codes.

    ``F.linear`` exports as ``MatMul(x, Transpose(W))`` and an attention's separate q/k/v projections as a
    Split of the joint weight first (a cross-attention's as Slices of it): with the DQ behind them, onnxruntime keeps those matmuls in float. The
    per-channel steps follow their axis (``perm.index(axis)``; split with the codes along it). Exact.
    """
    graph, folded = Graph(model), 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.g.node):
            if node.op_type not in ("Transpose", "Split", "Slice"):
                continue
            found = _dq_of_const(graph, node.input[0])
            if found is None:
                continue
            dq, codes, scale, zero_point = found
            axis = _attr(dq, "axis", 1) % codes.ndim
            per_channel = scale.size > 1
            if node.op_type == "Transpose":
                perm = list(_attr(node, "perm", list(range(codes.ndim))[::-1]))
                parts = [(codes.transpose(perm), scale, zero_point, perm.index(axis))]
            elif node.op_type == "Slice":
                index = _constant_slice(graph, node, codes.ndim)
                if index is None:
                    continue
                keep = index[axis] if per_channel else slice(None)
                parts = [(codes[index], scale[keep], zero_point[keep] if zero_point.size > 1 else zero_point, axis)]
            else:
                split_axis = _attr(node, "axis", 0) % codes.ndim
                sizes = graph.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
                if sizes is None:
                    continue
                bounds = np.cumsum(sizes)[:-1]
                pieces = np.split(codes, bounds, axis=split_axis)
                if per_channel and split_axis == axis:
                    scales = np.split(scale, bounds)
                    zeros = np.split(zero_point, bounds) if zero_point.size > 1 else [zero_point] * len(pieces)
                else:
                    scales, zeros = [scale] * len(pieces), [zero_point] * len(pieces)
                parts = [(c, sc, z, axis) for c, sc, z in zip(pieces, scales, zeros)]
            _replace_by_dqs(graph, node, [(c, sc, z, a if per_channel else None) for c, sc, z, a in parts])
            folded += 1
            changed = True
    return folded


def _constant_slice(graph: Graph, node: onnx.NodeProto, ndim: int) -> tuple[slice, ...] | None:
    """A Slice with constant starts/ends/axes and unit steps as a numpy index (ONNX clamps as Python does)."""
    names = list(node.input[1:5]) + [""] * (5 - len(node.input))
    values = [graph.const(name) if name else None for name in names]
    if values[0] is None or values[1] is None or any(name and value is None for name, value in zip(names, values)):
        return None
    starts, ends = values[0].reshape(-1), values[1].reshape(-1)
    axes = values[2].reshape(-1) if values[2] is not None else np.arange(len(starts))
    steps = values[3].reshape(-1) if values[3] is not None else np.ones(len(starts), np.int64)
    if np.any(steps != 1):
        return None
    index = [slice(None)] * ndim
    for start, end, axis in zip(starts, ends, axes):
        index[int(axis) % ndim] = slice(int(start), int(end))
    return tuple(index)


def quantize_biases(model: onnx.ModelProto) -> int:
    """Float bias of ``Conv(DQ(x), DQ(w), b)`` -> ``DQ(int32 round(b / (s_x s_w)))``."""
    graph, done = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type != "Conv" or len(node.input) < 3 or not node.input[2]:
            continue
        bias = graph.const(node.input[2])
        x_dq, w = graph.producer.get(node.input[0]), _dq_of_const(graph, node.input[1])
        if bias is None or bias.dtype != np.float32 or w is None or x_dq is None or x_dq.op_type != "DequantizeLinear":
            continue
        x_scale = graph.const(x_dq.input[1])
        if x_scale is None or x_scale.size != 1:
            continue
        scale = (np.float32(x_scale.reshape(-1)[0]) * w[2].astype(np.float32)).astype(np.float32).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape).copy() if scale.size == 1 else scale
        codes = np.clip(np.rint(bias / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        base = node.input[2].split("/")[-1]
        index = list(graph.g.node).index(node)
        scale_name = graph.unique(base + "_scale")
        if x_scale.size == 1 and w[2].size == bias.size:
            # s_x * s_w as a Mul of the two stored steps (onnxruntime folds it at load): no third copy
            x_step = graph.add_init(np.float32(x_scale.reshape(-1)[0]).reshape(()), base + "_x_step") \
                if x_scale.ndim else x_dq.input[1]
            graph.g.node.insert(index, helper.make_node("Mul", [x_step, w[0].input[1]], [scale_name],
                                                        name=graph.unique(node.name + "/bias_step")))
            graph.producer[scale_name] = graph.g.node[index]
            index += 1
        else:
            scale_name = graph.add_init(scale, base + "_scale")
        out = graph.unique(base + "_dequantized")
        dq = helper.make_node("DequantizeLinear", [graph.add_init(codes, base + "_int32"), scale_name], [out],
                              name=graph.unique(node.name + "/bias_dq"), axis=0)
        graph.g.node.insert(index, dq)
        node.input[2] = out
        done += 1
    return done


def scalar_qparams(model: onnx.ModelProto) -> int:
    """One-element ``[1]`` steps and zero points of Q/DQ nodes -> scalars (same values).

    The exporter writes per-tensor parameters as ``[1]`` tensors; onnxruntime fuses ``DQ -> Add/Mul -> Q``
    into QLinearAdd/QLinearMul only with scalar ones (QLinearConv accepts both).
    """
    graph, done, cache = Graph(model), 0, {}
    for node in graph.g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for slot in (1, 2):
            if slot >= len(node.input) or not node.input[slot]:
                continue
            value = graph.const(node.input[slot])
            if value is None or value.size != 1 or value.ndim == 0:
                continue
            if node.input[slot] not in cache:
                cache[node.input[slot]] = graph.add_init(value.reshape(()), node.input[slot] + "_scalar")
            node.input[slot] = cache[node.input[slot]]
            done += 1
    return done


def drop_zero_points(model: onnx.ModelProto) -> int:
    """Remove all-zero zero-point inputs of DQs of constants (int8 weights, int32 biases): 0 is the default."""
    graph, done = Graph(model), 0
    for node in graph.g.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or not node.input[2]:
            continue
        codes, zero_point = graph.const(node.input[0]), graph.const(node.input[2])
        if codes is None or zero_point is None or np.any(zero_point != 0) or zero_point.dtype != codes.dtype:
            continue
        del node.input[2]
        done += 1
    return done


def prelu_to_leakyrelu(model: onnx.ModelProto) -> int:
    """``PRelu(x, slope)`` with a single constant slope -> ``LeakyRelu(x, alpha=slope)`` (same values)."""
    graph, done = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type != "PRelu":
            continue
        slope = graph.const(node.input[1])
        if slope is None or slope.size != 1:
            continue
        leaky = helper.make_node("LeakyRelu", [node.input[0]], list(node.output), name=node.name + "/leaky",
                                 alpha=float(slope.reshape(-1)[0]))
        graph.g.node.insert(list(graph.g.node).index(node), leaky)
        graph.g.node.remove(node)
        done += 1
    return done


def requantize_before_integer_ops(model: onnx.ModelProto) -> int:
    """Insert ``Q -> DQ`` (the producer's parameters) between shape ops and an integer-capable op."""
    graph, inserted = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type not in INTEGER_CAPABLE:
            continue
        slots = INTEGER_CAPABLE[node.op_type] or range(len(node.input))
        for slot in slots:
            if slot >= len(node.input) or not node.input[slot]:
                continue
            name = node.input[slot]
            dq = _dq_through_shape_ops(graph, name)
            if dq is None:
                continue
            params = list(dq.input[1:])
            scale = graph.const(params[0])
            if scale is None or scale.size != 1:
                continue          # per-channel (weights) are folded, not re-quantized
            q_out, dq_out = graph.unique(name + "_requant_q"), graph.unique(name + "_requant")
            q = helper.make_node("QuantizeLinear", [name] + params, [q_out], name=graph.unique(node.name + "/requant_q"))
            d = helper.make_node("DequantizeLinear", [q_out] + params, [dq_out],
                                 name=graph.unique(node.name + "/requant_dq"))
            index = list(graph.g.node).index(node)
            graph.g.node.insert(index, d)
            graph.g.node.insert(index, q)
            node.input[slot] = dq_out
            graph.producer[q_out], graph.producer[dq_out] = q, d
            inserted += 1
    return inserted


def _dq_through_shape_ops(graph: Graph, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear reached from ``name`` backwards through >= 1 shape op, else None."""
    node, hops = graph.producer.get(name), 0
    while node is not None and node.op_type in SHAPE_OPS:
        if node.op_type == "Pad" and (len(node.input) > 2 and node.input[2] or _attr(node, "mode", b"constant") != b"constant"):
            return None       # non-zero padding value or reflect/edge: fine too, but keep it simple
        node, hops = graph.producer.get(node.input[0]), hops + 1
    if node is None or node.op_type != "DequantizeLinear" or hops == 0:
        return None
    if graph.const(node.input[0]) is not None:
        return None           # a constant (weight) behind a reshape: fold_constant_reshapes' business
    return node


def remove_dead(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nobody uses, then unused initializers; returns how many were removed."""
    g, removed = model.graph, 0
    changed = True
    while changed:
        changed = False
        used = {o.name for o in g.output} | {i for n in g.node for i in n.input} | _subgraph_inputs(g)
        for node in list(g.node):
            if not any(o in used for o in node.output if o):
                g.node.remove(node)
                removed += 1
                changed = True
    used = {i for n in g.node for i in n.input} | _subgraph_inputs(g) | {o.name for o in g.output}
    for init in list(g.initializer):
        if init.name not in used:
            g.initializer.remove(init)
            removed += 1
    for value in list(g.value_info):
        if value.name not in used and value.name not in {o for n in g.node for o in n.output}:
            g.value_info.remove(value)
    return removed


def _subgraph_inputs(g: onnx.GraphProto) -> set[str]:
    """Names the subgraphs of ``g`` read (outer-scope values among them)."""
    return {i for sub in _all_graphs(g) if sub is not g for n in sub.node for i in n.input}


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """``Constant`` nodes of the main graph become initializers (the same tensor, fewer bytes)."""
    g, moved = model.graph, 0
    for node in list(g.node):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            g.initializer.append(tensor)
            g.node.remove(node)
            moved += 1
    return moved


def dedupe_initializers(model: onnx.ModelProto) -> int:
    """Initializers with the same type, shape and bytes become one (e.g. a step shared by a Q/DQ pair)."""
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for tensor in list(g.initializer):
        if tensor.name in keep:
            continue
        key = (tensor.data_type, tuple(tensor.dims), tensor.raw_data or numpy_helper.to_array(tensor).tobytes())
        if key in first:
            alias[tensor.name] = first[key]
            g.initializer.remove(tensor)
        else:
            first[key] = tensor.name
    for node in _all_nodes(g):
        node.input[:] = [alias.get(i, i) for i in node.input]
    return len(alias)


CONV_DEFAULTS = {"dilations": lambda a: all(v == 1 for v in a.ints), "strides": lambda a: all(v == 1 for v in a.ints),
                 "pads": lambda a: all(v == 0 for v in a.ints), "group": lambda a: a.i == 1}
"""Conv attributes whose value is the ONNX default (the exporter writes them all)."""


def drop_default_attributes(model: onnx.ModelProto) -> int:
    """Remove Conv/ConvTranspose attributes that state the ONNX default."""
    dropped = 0
    for node in _all_nodes(model.graph):
        if node.op_type in ("Conv", "ConvTranspose"):
            keep = [a for a in node.attribute if not (a.name in CONV_DEFAULTS and CONV_DEFAULTS[a.name](a))]
            dropped += len(node.attribute) - len(keep)
            del node.attribute[:]
            node.attribute.extend(keep)
    return dropped


def _all_graphs(g: onnx.GraphProto):
    """``g`` and its subgraphs (If branches, Loop bodies), nested ones included."""
    yield g
    for node in g.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_graphs(sub)


def _all_nodes(g: onnx.GraphProto):
    """The nodes of ``g`` and of its subgraphs."""
    return (node for graph in _all_graphs(g) for node in graph.node)


NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _short_name(k: int) -> str:
    """``k``-th name of ``a, b, ..., Z, ba, ...``: a letter, then letters or digits."""
    name, k = NAME_CHARS[k % 52], k // 52
    while k:
        name, k = name + NAME_CHARS[k % 62], k // 62
    return name


def shorten_names(model: onnx.ModelProto, keep_prefix: str = "fqss:") -> int:
    """Shortest tensor names (``a``, ``b``, ... ``ba``...), no node names (but tagged ones) and no doc strings,
    in the graph and its subgraphs: the exporter's scope names take more bytes than the int8 weights of a
    small model. The model's inputs and outputs keep their names."""
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    mapping: dict[str, str] = {}
    for graph in _all_graphs(g):
        defined = [t.name for t in graph.initializer] + [o for n in graph.node for o in n.output]
        if graph is not g:
            defined += [v.name for v in graph.input]      # a Loop body's own inputs
        for name in defined:
            if name and name not in keep and name not in mapping:
                mapping[name] = _short_name(len(mapping))
    for graph in _all_graphs(g):
        graph.ClearField("doc_string")
        for t in graph.initializer:
            t.name = mapping.get(t.name, t.name)
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.name = mapping.get(value.name, value.name)
        for node in graph.node:
            node.input[:] = [mapping.get(i, i) for i in node.input]
            node.output[:] = [mapping.get(o, o) for o in node.output]
            node.ClearField("doc_string")
            if not node.name.startswith(keep_prefix):
                node.ClearField("name")
    return len(mapping)


def keep_softmax_float(model: onnx.ModelProto) -> int:
    """Put a one-input ``Max`` (an identity) in front of every Softmax, so that onnxruntime runs it in float.

    Otherwise onnxruntime fuses ``DQ -> Softmax -> Q`` into ``QLinearSoftmax``, which measured 5x slower than
    its float kernel on the embedded SepFormer's attention (35.6 vs 6.9 ms per 4 s mixture, 1 thread) and
    computes through a lookup table (0.9% of the softmax codes 1 LSB off torch's). The Q after the softmax
    stays, so the probabilities are still stored as 8-bit codes; returns how many were kept in float.
    """
    g, kept = model.graph, 0
    for node in [n for n in g.node if n.op_type == "Softmax"]:
        identity = helper.make_node("Max", [node.input[0]], [node.input[0] + "_float_softmax_input"])
        g.node.insert(list(g.node).index(node), identity)
        node.input[0] = identity.output[0]
        kept += 1
    return kept


COMPACT = (constants_to_initializers, dedupe_initializers, drop_default_attributes, shorten_names)
"""The passes that only make the file smaller (same graph): also applied to the fp32 baseline in benchmarks."""


PASSES = (remove_identities, fold_constant_elementwise, fold_weight_quantizers, fold_constant_reshapes,
          fold_constant_transposes, quantize_biases, scalar_qparams,
          prelu_to_leakyrelu,
          requantize_before_integer_ops, drop_zero_points, remove_dead) + COMPACT


def deploy(model: onnx.ModelProto, integer_softmax: bool = False) -> dict[str, int]:
    """Run every pass in order (and :func:`keep_softmax_float` unless ``integer_softmax``, before the
    compaction); returns what each one changed."""
    chosen = PASSES if integer_softmax else PASSES[:-len(COMPACT)] + (keep_softmax_float,) + COMPACT
    return {p.__name__: p(model) for p in chosen}


def tensor_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer bytes by element type (``int8``, ``int32``, ``float32``...)."""
    sizes: dict[str, int] = defaultdict(int)
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):      # two codes per byte
            count = int(np.prod(init.dims, dtype=np.int64))
            sizes[onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name] += (count + 1) // 2
            continue
        array = numpy_helper.to_array(init)
        sizes[str(array.dtype)] += array.nbytes
    return dict(sizes)

