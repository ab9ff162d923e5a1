"""4-bit weights in the file: weight codes of at most 4 bits stored as ONNX ``INT4``, two per byte.

A model trained with ``QuantConfig(weight_bits=4)`` (or 4-bit layers of a ``layer_weight_bits`` map) has
weight codes ``w ∈ [-8, 7]``; :func:`~fqss_plugin.export.to_onnx` writes them as int8 initializers behind a
``DequantizeLinear``. :func:`pack_int4_weights` rewrites every such initializer as ``INT4`` (opset 21's
``DequantizeLinear`` takes it, per output channel as before), which halves the weights' bytes; the
dequantized values, and so the model's function, are unchanged:

.. math::  \\hat w_{c,i} = s_c \\, w_{c,i}, \\qquad w_{c,i} \\in [-8, 7]\\ \\text{in int8 or in INT4 alike}.

The cost is speed: onnxruntime's CPU integer kernels (QLinearConv, MatMulInteger) take 8-bit weights, so
the convolutions and products behind an INT4 weight run in float after the dequantization (the integer kernels
that the deploy passes wrote, ConvInteger/MatMulInteger, read their INT4 weight through a ``Cast`` to int8 and
stay integer). This is the file to ship where size matters more than latency.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, version_converter

INT4_OPSET = 21                          # the first opset whose DequantizeLinear takes INT4


def pack_nibbles(codes: np.ndarray) -> bytes:
    """Signed codes in ``[-8, 7]`` as ONNX packs INT4: two per byte, the first element in the low nibble."""
    flat = codes.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = (flat.astype(np.uint8) & 0x0F)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def _int4_tensor(name: str, codes: np.ndarray) -> TensorProto:
    return onnx.helper.make_tensor(name, TensorProto.INT4, codes.shape, pack_nibbles(codes), raw=True)


INTEGER_KERNELS = ("ConvInteger", "MatMulInteger")
"""Integer ops that read weight codes directly (input 1); they take 8-bit weights, so an INT4 weight reaches
them through a ``Cast`` to int8 (onnxruntime folds it when the session loads)."""


def pack_int4_weights(model: onnx.ModelProto) -> int:
    """Store every int8 weight initializer whose codes fit ``[-8, 7]`` (read by ``DequantizeLinear`` with zero
    point 0, or as the weight of an integer kernel without a weight zero point) as INT4 without a zero point,
    converting the model to opset 21 first when it is older. Returns how many were packed."""
    def candidates(graph: onnx.GraphProto) -> list[tuple[str, np.ndarray, list[onnx.NodeProto]]]:
        inits = {t.name: t for t in graph.initializer}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)

        def zero(node: onnx.NodeProto, index: int) -> bool:
            name = node.input[index] if len(node.input) > index else ""
            return not name or (name in inits and not numpy_helper.to_array(inits[name]).any())

        def packable(node: onnx.NodeProto, name: str) -> bool:
            if node.op_type == "DequantizeLinear":
                return node.input[0] == name and zero(node, 2)
            return node.op_type in INTEGER_KERNELS and list(node.input).index(name) == 1 and zero(node, 3)

        found = []
        for name, tensor in inits.items():
            if tensor.data_type != TensorProto.INT8 or name not in readers:
                continue
            codes = numpy_helper.to_array(tensor)
            if codes.size >= 2 and codes.min() >= -8 and codes.max() <= 7 \
                    and all(packable(r, name) for r in readers[name]):
                found.append((name, codes, readers[name]))
        return found

    if not candidates(model.graph):
        return 0
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < INT4_OPSET:
        converted = version_converter.convert_version(model, INT4_OPSET)
        model.CopyFrom(converted)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    found = candidates(graph)
    for name, codes, readers in found:
        for reader in readers:
            if reader.op_type == "DequantizeLinear":
                del reader.input[2:]       # zero point 0 is the default (a shared int8 zero tensor stays int8)
        if all(r.op_type == "DequantizeLinear" for r in readers):
            inits[name].CopyFrom(_int4_tensor(name, codes))
            continue
        graph.initializer.remove(inits[name])
        graph.initializer.append(_int4_tensor(name + "_int4", codes))
        graph.node.insert(0, onnx.helper.make_node("Cast", [name + "_int4"], [name], to=TensorProto.INT8))
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    return len(found)


def write_int4_file(source, path) -> dict:
    """Write ``source`` (an int8 file of :func:`~fqss_plugin.export.to_onnx`) to ``path`` with its 4-bit weights
    packed (atomically; metadata ``int4_weights``: how many tensors). ``ValueError`` when no weight fits 4 bits."""
    from ..atomic import atomic_path
    from .passes import tensor_bytes
    model = onnx.load(str(source))
    packed = pack_int4_weights(model)
    if not packed:
        raise ValueError(f"{source}: no weight tensor has codes within 4 bits (train with QuantConfig(weight_bits=4) "
                         "or 4-bit layers in layer_weight_bits)")
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, "int4_weights": str(packed)})
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return {"packed": packed, "tensor_bytes": tensor_bytes(model)}
