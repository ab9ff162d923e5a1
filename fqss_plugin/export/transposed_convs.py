"""Transposed convolutions as ordinary convolutions, so that they can run with integer kernels.

onnxruntime has no integer transposed convolution on CPU: ``DQ -> ConvTranspose -> Q`` runs in float. A
transposed convolution of stride ``s`` and kernel ``K = m·s`` along one axis is ``s`` ordinary convolutions of
kernel ``m`` (its polyphase components), one per output phase ``r``:

.. math::  y[t s + r] = \\sum_{j < m} W[:, :, j s + r]^\\top\\, x[t - j] \\qquad (x = 0 \\text{ outside } 0..T-1)

i.e. one Conv with weight ``W'[(r, o), i, j] = W[i, o, (m-1-j)·s + r]`` (the kernel flipped, output channels
ordered phase-major) over the input padded by ``m - 1`` zeros on both sides, then the phases interleaved
(``t·s + r``) by Transpose/Reshape: ``(T + m - 1)·s = (T - 1)·s + K`` outputs, as ConvTranspose gives. The
axes of stride 1 are the same with ``s = 1``. The int8 weight codes are only re-indexed, so an int8
ConvTranspose becomes an int8 Conv, which :func:`~fqss_plugin.export.integer_kernels.integer_kernels` (or
onnxruntime's QLinearConv fusion) runs in integer. Handled: one strided axis at most, ``K`` a multiple of
``s`` there, no groups, dilation, padding or output padding (HTDemucs' decoders, Asteroid's filterbank
decoder); other ConvTransposes are left as they are.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .passes import Graph, _attr, remove_dead


def transposed_convs(model: onnx.ModelProto) -> int:
    """Rewrite every int8-weight ConvTranspose of the handled form (module docstring) as Conv + interleave;
    returns how many."""
    graph, done = Graph(model), 0
    for node in list(graph.g.node):
        if node.op_type != "ConvTranspose":
            continue
        weight = _int8_weight(graph, node.input[1])
        computed_bias = len(node.input) > 2 and node.input[2] and graph.const(node.input[2]) is None
        if weight is None or computed_bias or not _handled(node, graph.const(weight[0]).ndim - 2):
            continue
        _rewrite(graph, node, weight)
        done += 1
    if done:
        remove_dead(model)
    return done


def _int8_weight(graph: Graph, name: str) -> tuple[str, str, str | None] | None:
    """``(codes, scale, zero point)`` of a ConvTranspose weight ``DQ(int8 constant)``, per tensor or per output
    channel (axis 1), else None."""
    dq = graph.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in graph.init:
        return None
    codes, scale = graph.const(dq.input[0]), graph.const(dq.input[1])
    if codes.dtype != np.int8 or scale is None or (scale.size > 1 and _attr(dq, "axis", 1) != 1):
        return None
    zero = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
    return dq.input[0], dq.input[1], zero


def _handled(node: onnx.NodeProto, spatial: int) -> bool:
    kernel = list(_attr(node, "kernel_shape", []))
    strides = list(_attr(node, "strides", [1] * spatial))
    zeros = [0] * spatial
    return (len(kernel) == spatial and _attr(node, "group", 1) == 1 and _attr(node, "auto_pad", b"NOTSET") in
            (b"NOTSET", "NOTSET") and _attr(node, "output_shape") is None
            and list(_attr(node, "dilations", [1] * spatial)) == [1] * spatial
            and list(_attr(node, "pads", zeros * 2)) == zeros * 2
            and list(_attr(node, "output_padding", zeros)) == zeros
            and sum(s > 1 for s in strides) <= 1 and all(k % s == 0 for k, s in zip(kernel, strides)))


def polyphase_weight(codes: np.ndarray, axis: int, stride: int) -> np.ndarray:
    """The Conv weight ``(s·C_out, C_in, ..., K/s, ...)`` of a ConvTranspose weight ``(C_in, C_out, ...)`` of
    stride ``stride`` along spatial ``axis`` (stride 1 elsewhere): see the module docstring."""
    w = np.swapaxes(codes, 0, 1)                                  # (C_out, C_in, *kernel)
    at = 2 + axis
    w = np.flip(w, tuple(a for a in range(2, w.ndim) if a != at))
    shape = w.shape
    w = w.reshape(shape[:at] + (shape[at] // stride, stride) + shape[at + 1:])
    w = np.moveaxis(np.flip(w, at), at + 1, 0)                    # (s, C_out, C_in, ..., m, ...)
    return np.ascontiguousarray(w.reshape((stride * shape[0],) + shape[1:at] + (shape[at] // stride,)
                                          + shape[at + 1:]))


def _rewrite(graph: Graph, node: onnx.NodeProto, weight: tuple[str, str, str | None]) -> None:
    codes_name, scale_name, zero_name = weight
    codes = graph.const(codes_name)
    spatial = codes.ndim - 2
    kernel = list(_attr(node, "kernel_shape"))
    strides = list(_attr(node, "strides", [1] * spatial))
    axis = max(range(spatial), key=lambda a: strides[a])          # the strided axis (any, if none is)
    stride, c_out = strides[axis], codes.shape[1]
    base = node.output[0]
    new = []

    scale = graph.const(scale_name)
    conv_scale = np.tile(scale.reshape(-1), stride) if scale.size > 1 else scale
    inputs = [graph.add_init(polyphase_weight(codes, axis, stride), base + "_polyphase_codes"),
              graph.add_init(conv_scale.astype(np.float32), base + "_polyphase_scale")]
    if zero_name is not None:
        zero = graph.const(zero_name)
        inputs.append(graph.add_init(np.tile(zero.reshape(-1), stride) if zero.size > 1 else zero,
                                     base + "_polyphase_zero"))
    dq = graph.unique(base + "_polyphase_weight")
    new.append(helper.make_node("DequantizeLinear", inputs, [dq], name=dq, axis=0))
    conv_inputs = [node.input[0], dq]
    if len(node.input) > 2 and node.input[2]:
        conv_inputs.append(graph.add_init(np.tile(graph.const(node.input[2]), stride), base + "_polyphase_bias"))
    pads = [k // s - 1 for k, s in zip(kernel, [strides[a] if a == axis else 1 for a in range(spatial)])]
    phases = graph.unique(base + "_phases")
    new.append(helper.make_node("Conv", conv_inputs, [phases], name=phases,
                                kernel_shape=[k // (stride if a == axis else 1) for a, k in enumerate(kernel)],
                                pads=pads * 2))
    new.extend(_interleave(graph, phases, base, spatial, axis, stride, c_out))
    new[-1].output[0] = node.output[0]
    index = list(graph.g.node).index(node)
    del graph.g.node[index]
    for offset, added in enumerate(new):
        graph.g.node.insert(index + offset, added)
        graph.producer.update({o: graph.g.node[index + offset] for o in added.output})


def _interleave(graph: Graph, phases: str, base: str, spatial: int, axis: int, stride: int,
                c_out: int) -> list[onnx.NodeProto]:
    """``(B, s·C, *S)`` phase-major -> ``(B, C, *S)`` with ``S[axis]`` multiplied by ``s`` (``t·s + r``).
    Only Reshape targets of 0 (copy) and -1, so any batch and length."""
    n, steps, current = spatial, [], phases

    def step(op: str, **kwargs) -> None:
        nonlocal current
        out = graph.unique(f"{base}_interleave{len(steps)}")
        if op == "Reshape":
            target = graph.add_init(np.array(kwargs.pop("shape"), np.int64), out + "_shape")
            steps.append(helper.make_node(op, [current, target], [out], name=out))
        else:
            steps.append(helper.make_node(op, [current], [out], name=out, **kwargs))
        graph.producer[out] = steps[-1]
        current = out

    others = [1 + i for i in range(n) if i != axis]
    step("Transpose", perm=[0, *range(2, n + 2), 1])                 # (B, *S, s·C)
    step("Reshape", shape=[0] * (n + 1) + [stride, c_out])           # (B, *S, s, C)
    step("Transpose", perm=[0, n + 2, *others, 1 + axis, n + 1])     # (B, C, *S_others, S_axis, s)
    step("Reshape", shape=[0] * (n + 1) + [-1])                      # (B, C, *S_others, S_axis·s)
    if axis != n - 1:
        order = [2 + i if i < axis else (n + 1 if i == axis else 1 + i) for i in range(n)]
        step("Transpose", perm=[0, 1, *order])
    return steps
