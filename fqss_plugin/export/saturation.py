"""Int8 files that give the same output on every CPU: the u8 x s8 pairwise saturation, its guard and emulation.

x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI) multiply uint8 activations by int8 weights with
``vpmaddubsw``, which adds two adjacent products into a **saturating int16**:

.. math::  p_k = \\mathrm{sat}_{16}(a_{2k} w_{2k} + a_{2k+1} w_{2k+1}), \\qquad y = \\sum_k p_k \\;(\\text{int32})

onnxruntime's MLAS kernels (QLinearConv, MatMulIntegerToFloat, ...) take that path on such CPUs, so a
pair with :math:`255 (|w_i| + |w_j|) > 32767` can clip: with abs-max per-channel weights every channel
holds a code of ±127, and the output is wrong. CPUs with VNNI (``vpdpbusd``, int32 accumulation) and
uint8 x uint8 kernels (operands widened to int16 first) do not saturate.

A file is **portable** when no integer Conv/MatMul can saturate, whatever the activation values and
the order in which the kernel pairs its products:

.. math::  a_{max} \\cdot \\max_c \\big(|w|_{(1),c} + |w|_{(2),c}\\big) \\le 32767

with :math:`a_{max} = 255` (the largest uint8 code; int8 activations are shifted onto uint8 by the kernels)
and :math:`|w|_{(1),c}, |w|_{(2),c}` the two largest weight codes of output channel ``c``. 7-bit weight
codes (``|w| <= 64``: :math:`255 \\cdot 128 = 32640`) satisfy it by construction.

* :func:`saturation_risks` -- the guard: the integer ops of an ONNX graph (Loop bodies included) that
  break the bound. :func:`~fqss_plugin.export.to_onnx` runs it on every file it writes.
* :func:`u8s8_matmul_pairwise` / :func:`u8s8_matmul_exact` -- a numpy emulation of the saturating kernel
  and the exact integer product, to reproduce the wrong outputs on any machine.
Whether the machine at hand takes the saturating path is :mod:`fqss_plugin.export.cpu`'s question.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .passes import _all_graphs

INT16_MAX = 32767
ACTIVATION_CODE_MAX = 255
"""The largest activation code an 8-bit kernel multiplies (uint8; int8 activations are shifted by 128)."""
PORTABLE = "portable"
VNNI = "vnni"
TARGETS = (PORTABLE, VNNI)
"""``int8_target`` of an exported file: ``portable`` (exact on every CPU) or ``vnni`` (needs VNNI, AVX-512
VNNI/AVX-VNNI on x86, or a non-x86 CPU, whose int8 dot products accumulate in int32)."""
METADATA_KEY = "int8_target"

WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "MatMul": 1, "MatMulInteger": 1, "Gemm": 1}
"""The weight operand of the integer-capable ops (MatMul also checked on its first operand)."""


@dataclass
class SaturationRisk:
    """An integer Conv/MatMul whose weights can saturate a u8 x s8 pair in int16."""

    node: str
    op_type: str
    pair_sum: int          # the largest sum of the two largest |codes| of one output channel
    bound: int             # ACTIVATION_CODE_MAX * pair_sum

    def __str__(self) -> str:
        return (f"{self.op_type} {self.node!r}: {ACTIVATION_CODE_MAX} x {self.pair_sum} = {self.bound} > "
                f"{INT16_MAX}")


def _index(model: onnx.ModelProto) -> tuple[dict, dict, dict]:
    """Initializers, producers and each initializer's graph, over the graph and its subgraphs (a Loop body reads the
    outer graph's initializers)."""
    inits, producers, owners = {}, {}, {}
    for g in _all_graphs(model.graph):
        for t in g.initializer:
            inits[t.name], owners[t.name] = t, g
        producers.update({o: n for n in g.node for o in n.output})
    return inits, producers, owners


def _int8_weight_codes(name: str, producers: dict, inits: dict) -> np.ndarray | None:
    """The int8 codes behind ``name``: an int8 initializer (QLinearConv's weight) or ``DequantizeLinear`` of one."""
    node = producers.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        name = node.input[0]
    elif node is not None:
        return None
    codes = inits.get(name)
    if codes is None:
        return None
    codes = numpy_helper.to_array(codes)
    return codes if codes.dtype == np.int8 else None


def pair_sums(codes: np.ndarray, channel_axis: int) -> np.ndarray:
    """Per output channel, the sum of its two largest ``|code|`` (the worst pair a kernel can form)."""
    moved = np.moveaxis(np.abs(codes.astype(np.int32)), channel_axis, 0).reshape(codes.shape[channel_axis], -1)
    if moved.shape[1] < 2:
        return moved[:, 0] if moved.shape[1] else np.zeros(moved.shape[0], np.int32)
    top2 = -np.partition(-moved, 1, axis=1)[:, :2]
    return top2.sum(axis=1)


def saturation_risks(model: onnx.ModelProto) -> list[SaturationRisk]:
    """Every Conv/MatMul/Gemm (in every subgraph) fed an int8 weight ``DequantizeLinear`` that a
    uint8 activation can saturate on a CPU without VNNI (the bound in the module docstring)."""
    inits, producers, _ = _index(model)
    risks = []
    for g in _all_graphs(model.graph):
        for node in g.node:
            if node.op_type not in WEIGHT_INPUT:
                continue
            for index in _weight_indices(node):
                codes = _int8_weight_codes(node.input[index], producers, inits)
                if codes is None or codes.ndim == 0:
                    continue
                channel_axis = _channel_axis(node, index, codes.ndim)
                worst = int(pair_sums(codes, channel_axis).max(initial=0))
                if ACTIVATION_CODE_MAX * worst > INT16_MAX:
                    risks.append(SaturationRisk(node.name or node.output[0], node.op_type, worst,
                                                ACTIVATION_CODE_MAX * worst))
    return risks


def _weight_indices(node: onnx.NodeProto) -> list[int]:
    """The inputs of ``node`` that may be constant weights (a MatMul's either operand)."""
    indices = [WEIGHT_INPUT[node.op_type]] + ([0] if node.op_type == "MatMul" else [])
    return [i for i in indices if i < len(node.input)]


def _channel_axis(node: onnx.NodeProto, index: int, ndim: int) -> int:
    """The output-channel axis of a weight: 0 for Conv, the non-reduced one for MatMul/Gemm."""
    if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else ndim - 1
    return ndim - 1 if index == 1 else max(ndim - 2, 0)     # MatMul: B [.., K, N] -> N; A [.., M, K] -> M


def uint8_weights(model: onnx.ModelProto, risks: list[SaturationRisk]) -> int:
    """Make the weights of the ``risks``' ops uint8 (codes + 128, zero point 128): the same values, which
    the kernels multiply as u8 x u8, widened to int16 first (no saturation, slower than u8 x s8).
    Returns the number of weight tensors converted."""
    names = {r.node for r in risks}
    inits, producers, owners = _index(model)
    done: set[str] = set()
    for g in _all_graphs(model.graph):
        for node in g.node:
            if (node.name or node.output[0]) not in names:
                continue
            for index in _weight_indices(node):
                if _int8_weight_codes(node.input[index], producers, inits) is None:
                    continue
                dq = producers.get(node.input[index])
                if dq is None and node.op_type in ("ConvInteger", "MatMulInteger"):
                    _uint8_integer_op(node, inits, owners)
                    done.add(node.name or node.output[0])
                    continue
                if dq is None:
                    raise ValueError(f"{node.op_type} {node.name!r}: int8 weights without a DequantizeLinear "
                                     "(an integer-op graph, not QDQ) cannot be made uint8")
                if dq.output[0] in done:
                    continue
                codes, scale = (numpy_helper.to_array(inits[dq.input[k]]) for k in (0, 1))
                zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
                if zero is not None and np.any(zero):
                    raise ValueError(f"{dq.name or dq.output[0]}: int8 weights with a non-zero zero point")
                owner, base = owners[dq.input[0]], dq.input[0]
                if base + "_u8" not in inits:          # codes shared by several DQs are converted once
                    for name, array in ((base + "_u8", (codes.astype(np.int16) + 128).astype(np.uint8)),
                                        (base + "_u8zp", np.full(scale.shape, 128, np.uint8))):
                        owner.initializer.append(numpy_helper.from_array(array, name))
                        inits[name] = owner.initializer[-1]
                scale_name = dq.input[1]
                del dq.input[:]
                dq.input.extend([base + "_u8", scale_name, base + "_u8zp"])
                done.add(dq.output[0])
    return len(done)


def _uint8_integer_op(node: onnx.NodeProto, inits: dict, owners: dict) -> None:
    """A ``ConvInteger``/``MatMulInteger`` on int8 codes reads them as uint8 (codes + 128) with the weight zero
    point 128."""
    base = node.input[1]
    if base + "_u8" not in inits:
        codes = numpy_helper.to_array(inits[base])
        owner = owners[base]
        for name, array in ((base + "_u8", (codes.astype(np.int16) + 128).astype(np.uint8)),
                            (base + "_u8zp", np.array(128, np.uint8))):
            owner.initializer.append(numpy_helper.from_array(array, name))
            inits[name] = owner.initializer[-1]
    while len(node.input) < 4:
        node.input.append("")
    node.input[1], node.input[3] = base + "_u8", base + "_u8zp"


# -- numpy emulation of the kernels ---------------------------------------------------------------

def u8s8_matmul_exact(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a [M, K] uint8 @ w [K, N] int8`` accumulated exactly in int32 (VNNI, ARM dot products)."""
    return a.astype(np.int32) @ w.astype(np.int32)


def u8s8_matmul_pairwise(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a [M, K] uint8 @ w [K, N] int8`` as ``vpmaddubsw`` + ``vpmaddwd`` compute it: adjacent products along
    ``K`` (padded with a zero to an even length) are added in pairs and saturated to int16, then the
    pairs are summed in int32."""
    a32, w32 = a.astype(np.int32), w.astype(np.int32)
    if a32.shape[1] % 2:
        a32 = np.pad(a32, ((0, 0), (0, 1)))
        w32 = np.pad(w32, ((0, 1), (0, 0)))
    pairs = a32[:, 0::2, None] * w32[None, 0::2] + a32[:, 1::2, None] * w32[None, 1::2]     # [M, K/2, N]
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(axis=1)
