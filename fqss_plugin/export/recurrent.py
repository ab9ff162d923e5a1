"""Exporting :class:`~fqss_plugin.quant.QLSTM`: its time loop as an ONNX ``Loop``, so the graph runs on any length.

Tracing the Python time loop would unroll it into a graph fixed to the example's length. Instead,
the export view (:func:`export_lstms`) runs the loop inside :class:`_LSTMRecurrence`, an autograd
function that in torch calls :func:`~fqss_plugin.quant.recurrent.lstm_recurrence` itself (bit-identical)
and in the trace leaves one placeholder node ``fqss.LSTMRecurrence`` per layer and direction, carrying
the steps and zero points of the loop's quantizers. :func:`expand_lstm_recurrences` then replaces each
placeholder by a standard ``Loop`` whose body computes, with ``QDQ(v) = DequantizeLinear(QuantizeLinear(v))``
and the carried states ``h``, ``c``::

    x_t = Gather(X, t)                  t = i, or T - 1 - i for the backward direction
    r   = QDQ(h W_hh^T + b_hh)          a   = QDQ(x_t + r)
    i, f, o = Split(QDQ(Sigmoid(a[:3H])))      g = QDQ(Tanh(a[3H:]))
    c   = QDQ(QDQ(f * c) + QDQ(i * g))  h   = QDQ(o * QDQ(Tanh(c)))

and scans ``h`` (reversed back into time order for the backward direction). The input projection
``X = QDQ(x W_ih^T + b_ih)`` of all steps stays outside the loop, in the traced graph, where the deploy
passes make its weights int8 like any other matmul's. The weights' rows are put in the loop's gate order
[i, f, o, g] once, in the view, so that the graph has no gather of weight rows.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..quant.recurrent import ACTIVATION_POINTS, QLSTM, _gate_order, lstm_recurrence

DOMAIN = "fqss"
PLACEHOLDER = "LSTMRecurrence"
LOOP_POINTS = ACTIVATION_POINTS[1:]
"""The quantizers inside the time loop (all but ``input_proj``), in the order the placeholder lists them."""


class _LoopQuantizers:
    """The loop's quantizers as ``torch.fake_quantize_per_tensor_affine`` on given steps and zero points:
    what each :class:`~fqss_plugin.quant.quantizers.FrozenActivationQuantizer` computes, from tensors the
    autograd function received as inputs (the tracer cannot follow module buffers read inside it)."""

    def __init__(self, qparams: tuple[torch.Tensor, ...]) -> None:
        for k, point in enumerate(LOOP_POINTS):
            setattr(self, f"{point}_quantizer", functools.partial(
                torch.fake_quantize_per_tensor_affine, scale=qparams[2 * k], zero_point=qparams[2 * k + 1],
                quant_min=0, quant_max=255))


class _LSTMRecurrence(torch.autograd.Function):
    """:func:`lstm_recurrence` in torch; one ``fqss.LSTMRecurrence`` node in the ONNX trace.

    ``quantizers`` (the direction's :class:`~fqss_plugin.quant.recurrent.LSTMDirectionQuantizers`) gives the
    placeholder its attributes; ``qparams`` are the same steps and zero points as tensors, for torch.
    """

    @staticmethod
    def forward(ctx, x_proj, h, c, w_hh, b_hh, quantizers, reverse: bool, *qparams):
        return lstm_recurrence(x_proj, h, c, w_hh, b_hh, _LoopQuantizers(qparams), reverse)

    @staticmethod
    def symbolic(g, x_proj, h, c, w_hh, b_hh, quantizers, reverse: bool, *qparams):
        qparams = [getattr(quantizers, f"{point}_quantizer").qparams() for point in LOOP_POINTS]
        inputs = [x_proj, h, c, w_hh] + ([b_hh] if b_hh is not None else [])
        hidden = quantizers.weight_hh_quantizer.scale.numel() // 4
        outputs = g.op(f"{DOMAIN}::{PLACEHOLDER}", *inputs, reverse_i=int(reverse), hidden_i=hidden,
                       scales_f=[float(scale.reshape(-1)[0]) for scale, _ in qparams],
                       zero_points_i=[int(zero_point.reshape(-1)[0]) for _, zero_point in qparams], outputs=3)
        outputs[0].setType(x_proj.type().with_sizes([None, None, hidden]))     # [T, B, H]; h_T, c_T like h_0
        for output, state in zip(outputs[1:], (h, c)):
            output.setType(state.type())
        return outputs


class ExportQLSTM(QLSTM):
    """:class:`QLSTM` whose parameters are stored in the loop's gate order and whose time loop is one
    :class:`_LSTMRecurrence` call per layer and direction (:func:`export_lstms` sets it up)."""

    def _gate_ordered_parameters(self, layer: int, reverse: bool, q):
        suffix = f"_l{layer}" + ("_reverse" if reverse else "")
        biases = (getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix)) if self.bias else (None, None)
        return (q.weight_ih_quantizer(getattr(self, "weight_ih" + suffix)),
                q.weight_hh_quantizer(getattr(self, "weight_hh" + suffix))) + biases

    def _run_direction(self, x, layer, reverse, h, c):
        q = self.quantizers[f"l{layer}" + ("_reverse" if reverse else "")]
        w_ih, w_hh, b_ih, b_hh = self._gate_ordered_parameters(layer, reverse, q)
        x_proj = q.input_proj_quantizer(torch.nn.functional.linear(x, w_ih, b_ih))
        qparams = [t for point in LOOP_POINTS for t in getattr(q, f"{point}_quantizer").qparams()]
        return _LSTMRecurrence.apply(x_proj, h, c, w_hh, b_hh, q, reverse, *qparams)


@torch.no_grad()
def export_lstms(model: nn.Module) -> None:
    """Turn every frozen :class:`QLSTM` of ``model`` (an export copy) into an :class:`ExportQLSTM`, in place.

    Rows of the weights, biases and per-row weight steps are permuted together into the gate order
    [i, f, o, g]: the quantized rows are the same numbers, in the order the loop reads them.
    """
    for module in model.modules():
        if type(module) is not QLSTM:
            continue
        order = _gate_order(module.hidden_size, torch.device("cpu"))
        for key, quantizers in module.quantizers.items():
            suffix = "_" + key
            for kind in ("ih", "hh"):
                weight = getattr(module, f"weight_{kind}{suffix}")
                weight.copy_(weight.index_select(0, order))
                if module.bias:
                    bias = getattr(module, f"bias_{kind}{suffix}")
                    bias.copy_(bias.index_select(0, order))
                quantizer = getattr(quantizers, f"weight_{kind}_quantizer")
                quantizer.scale.copy_(quantizer.scale.index_select(0, order))
        module.__class__ = ExportQLSTM


def expand_lstm_recurrences(model: onnx.ModelProto) -> int:
    """Replace every ``fqss.LSTMRecurrence`` placeholder by its ``Loop`` (module docstring); returns how many."""
    g = model.graph
    expanded = 0
    for position, node in reversed(list(enumerate(g.node))):
        if node.domain != DOMAIN or node.op_type != PLACEHOLDER:
            continue
        nodes = _loop_nodes(node, f"lstm{expanded}_")
        del g.node[position]
        for k, new in enumerate(nodes):
            g.node.insert(position + k, new)
        expanded += 1
    if expanded:
        kept = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return expanded


def _loop_nodes(node: onnx.NodeProto, prefix: str) -> list[onnx.NodeProto]:
    """The main-graph nodes replacing one placeholder: trip count, transposed ``W_hh``, the ``Loop`` and,
    for the backward direction, the flip of the scanned outputs.

    The body reads ``X`` as it is, a DequantizeLinear output, and walks it backwards for the backward direction
    (``t = T - 1 - i``): onnxruntime 1.32 aborts at session creation when a loop body reads a shape op (a Slice
    reversing ``X``, an Unsqueeze) applied right after a DequantizeLinear of the outer graph.
    """
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    reverse = bool(attrs["reverse"])
    x, h0, c0, w_hh = node.input[:4]
    bias = node.input[4] if len(node.input) > 4 else None
    outputs, h_last, c_last = node.output
    name = lambda s: prefix + s                                            # noqa: E731
    one = lambda s, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name(s))  # noqa: E731
    outer = [
        helper.make_node("Constant", [], [name("zero")], value=one("zero_value", 0)),
        helper.make_node("Shape", [x], [name("shape")]),
        helper.make_node("Gather", [name("shape"), name("zero")], [name("steps")], axis=0),
        helper.make_node("Transpose", [w_hh], [name("w_hh_t")], perm=[1, 0]),
    ]
    if reverse:
        outer += [helper.make_node("Constant", [], [name("one")], value=one("one_value", 1)),
                  helper.make_node("Sub", [name("steps"), name("one")], [name("last")])]
    body = _loop_body(x, name("w_hh_t"), bias, name("last") if reverse else None, attrs["hidden"],
                      attrs["scales"], attrs["zero_points"], prefix)
    scanned = name("scanned") if reverse else outputs
    loop = helper.make_node("Loop", [name("steps"), "", h0, c0], [h_last, c_last, scanned], body=body)
    flip = []
    if reverse:
        ints = lambda s, v: numpy_helper.from_array(np.array([v], dtype=np.int64), name(s))  # noqa: E731
        flip = [helper.make_node("Constant", [], [name(k)], value=ints(k + "_value", v))
                for k, v in (("start", -1), ("end", np.iinfo(np.int64).min), ("axis", 0), ("step", -1))]
        flip.append(helper.make_node("Slice", [scanned, name("start"), name("end"), name("axis"), name("step")],
                                     [outputs]))
    return outer + [loop] + flip


def _loop_body(x: str, w_hh_t: str, bias: str | None, last: str | None, hidden: int, scales: list[float],
               zero_points: list[int], prefix: str) -> onnx.GraphProto:
    """The body graph: inputs (i, cond, h, c), outputs (cond, h, c, h again for the scan)."""
    name = lambda s: prefix + "b_" + s                                     # noqa: E731
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    qparams = dict(zip(LOOP_POINTS, zip(scales, zero_points)))

    def op(op_type: str, inputs: list[str], output: str, **kwargs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [name(output)], **kwargs))
        return name(output)

    def qdq(value: str, point: str) -> str:
        scale, zero_point = qparams[point]
        initializers.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), name(point + "_scale")))
        initializers.append(numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), name(point + "_zero")))
        codes = op("QuantizeLinear", [value, name(point + "_scale"), name(point + "_zero")], point + "_q")
        return op("DequantizeLinear", [codes, name(point + "_scale"), name(point + "_zero")], point)

    t = op("Sub", [last, name("i")], "t") if last else name("i")
    x_t = op("Gather", [x, t], "x_t", axis=0)
    recurrent = op("MatMul", [name("h_in"), w_hh_t], "h_w")
    if bias:
        recurrent = op("Add", [recurrent, bias], "h_w_b")
    gates = qdq(op("Add", [x_t, qdq(recurrent, "recurrent_proj")], "gates_sum"), "gates")
    def split(value: str, parts: list[int], outputs: list[str]) -> None:
        initializers.append(numpy_helper.from_array(np.array(parts, dtype=np.int64), name(outputs[0] + "_sizes")))
        nodes.append(helper.make_node("Split", [value, name(outputs[0] + "_sizes")], [name(o) for o in outputs],
                                      axis=1))

    split(gates, [3 * hidden, hidden], ["sigmoid_part", "tanh_part"])
    sigmoid = qdq(op("Sigmoid", [name("sigmoid_part")], "sigmoid_f"), "sigmoid")
    split(sigmoid, [hidden] * 3, ["in_gate", "forget_gate", "out_gate"])
    g = qdq(op("Tanh", [name("tanh_part")], "tanh_f"), "tanh")
    c = qdq(op("Add", [qdq(op("Mul", [name("forget_gate"), name("c_in")], "fc"), "forget_cell"),
                       qdq(op("Mul", [name("in_gate"), g], "ig"), "input_cell")], "c_sum"), "cell")
    h = qdq(op("Mul", [name("out_gate"), qdq(op("Tanh", [c], "c_tanh"), "cell_tanh")], "h_prod"), "hidden")
    value = helper.make_tensor_value_info
    return helper.make_graph(
        nodes, prefix + "body",
        [value(name("i"), TensorProto.INT64, []), value(name("cond_in"), TensorProto.BOOL, []),
         value(name("h_in"), TensorProto.FLOAT, None), value(name("c_in"), TensorProto.FLOAT, None)],
        [value(name("cond_in"), TensorProto.BOOL, []), value(h, TensorProto.FLOAT, None),
         value(c, TensorProto.FLOAT, None), value(h, TensorProto.FLOAT, None)],
        initializer=initializers)
