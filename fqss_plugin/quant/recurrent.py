"""A fully quantized ``torch.nn.LSTM``: every gate, state and projection on an integer grid.

``nn.LSTM`` runs a fused kernel, so a module wrapper can only quantize its weights and its output
sequence: gates, cell and hidden states stay float (this is what the published ``LSTMQ`` does).
:class:`QLSTM` unrolls the recurrence in Python with the same parameters (same names, so an
``nn.LSTM`` ``state_dict`` loads strictly) and quantizes every intermediate an integer engine
would store. For each layer ``l`` and direction (``_reverse`` for the backward one), with
``Q_*`` per-tensor activation quantizers and ``W_q = Q_w(W)`` per-row (per gate unit) weights::

    X_t   = Q_x(x_t W_ih_q^T + b_ih)                   input projection, all t in one matmul
    for t (forward) or reversed t (backward):
      R_t = Q_r(h_{t-1} W_hh_q^T + b_hh)               recurrent projection
      A_t = Q_gates(X_t + R_t)                          gate pre-activations [i, f, g, o]
      i, f, o = Q_sigmoid(sigmoid(A_t[i, f, o]))        one quantizer, values in [0, 1]
      g   = Q_tanh(tanh(A_t[g]))
      c_t = Q_cell(Q_forget(f * c_{t-1}) + Q_input(i * g))
      h_t = Q_hidden(o * Q_cell_tanh(tanh(c_t)))

The two products ``f * c`` and ``i * g`` are quantized before they are added: an integer engine
stores each product before the addition, and quantizing them keeps every arithmetic op's input
on a grid, which is what :func:`~fqss_plugin.coverage_report` checks. The bidirectional output
``cat(h_fwd, h_bwd)`` joins two grids with different steps, so it gets one more quantizer
(``Q_out``, like :class:`~fqss_plugin.quant.layers.QConcat`); a unidirectional layer's output is
``h_t`` itself. Biases stay float here and become int32 at export, as in the other wrappers.
Initial states ``(h_0, c_0)`` are inputs: like every input they are assumed to be quantized by
their producer (zeros, the default, are on every grid).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .config import QuantConfig
from .layers import QuantizedModule
from .quantizers import activation_quantizer, weight_quantizer
from .registry import register

ACTIVATION_POINTS = ("input_proj", "recurrent_proj", "gates", "sigmoid", "tanh", "forget_cell", "input_cell",
                     "cell", "cell_tanh", "hidden")
"""The activation quantizers of one LSTM direction (``<point>_quantizer``), in computation order."""


class LSTMDirectionQuantizers(nn.Module):
    """The quantizers of one layer and direction of a :class:`QLSTM` (a container, it has no forward).

    ``weight_ih_quantizer``/``weight_hh_quantizer``: per gate row (``4·hidden`` channels, axis 0);
    and ``<point>_quantizer`` for every point in :data:`ACTIVATION_POINTS`.
    """

    def __init__(self, hidden_size: int, config: QuantConfig) -> None:
        super().__init__()
        rows = 4 * hidden_size
        self.weight_ih_quantizer = weight_quantizer(rows, config)
        self.weight_hh_quantizer = weight_quantizer(rows, config)
        for point in ACTIVATION_POINTS:
            setattr(self, f"{point}_quantizer", activation_quantizer(config))


class QLSTM(QuantizedModule, nn.LSTM):
    """``nn.LSTM`` with quantized weights, gates, cell and hidden states (see the module docstring).

    Supports several layers, ``bidirectional``, ``batch_first`` both ways, unbatched input,
    initial states and inter-layer ``dropout`` (training only). Projections (``proj_size > 0``)
    and ``PackedSequence`` inputs raise ``NotImplementedError``. Quantizers live in
    ``self.quantizers["l{k}"]`` and ``self.quantizers["l{k}_reverse"]``
    (:class:`LSTMDirectionQuantizers`), next to the upstream parameters ``weight_ih_l{k}`` etc.;
    a bidirectional LSTM also has ``self.output_quantizers[k]`` for each layer's concatenated output.
    """

    float_internals = "bias: float in QAT, int32 (scale s_x*s_w) at export"

    @classmethod
    def convert_(cls, module: nn.Module, config: QuantConfig) -> nn.Module:
        if module.proj_size > 0:
            raise NotImplementedError("QLSTM: nn.LSTM with proj_size > 0 is not supported; leave this LSTM in float "
                                      "with QuantConfig(exclude=(<its module name>,))")
        if module.mode != "LSTM":
            raise TypeError(f"QLSTM converts nn.LSTM only, got mode {module.mode!r}")
        return super().convert_(module, config)

    def _init_quantization(self, config: QuantConfig) -> None:
        directions = ["", "_reverse"] if self.bidirectional else [""]
        self.quantizers = nn.ModuleDict({f"l{layer}{suffix}": LSTMDirectionQuantizers(self.hidden_size, config)
                                         for layer in range(self.num_layers) for suffix in directions})
        self.output_quantizers = (nn.ModuleList(activation_quantizer(config) for _ in range(self.num_layers))
                                  if self.bidirectional else None)

    def flatten_parameters(self) -> None:
        """No fused kernel runs here, so there is nothing to flatten."""

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            raise NotImplementedError("QLSTM: PackedSequence input is not supported; pad the batch instead")
        batched = input.dim() == 3
        if not batched:
            if input.dim() != 2:
                raise ValueError(f"QLSTM: expected a 2-D or 3-D input, got {input.dim()}-D")
            input = input.unsqueeze(1)
            if hx is not None:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        elif self.batch_first:
            input = input.transpose(0, 1)
        seq_len, batch, _ = input.shape
        num_directions = 2 if self.bidirectional else 1
        if hx is None:
            zeros = torch.zeros(self.num_layers * num_directions, batch, self.hidden_size,
                                dtype=input.dtype, device=input.device)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = hx
            expected = (self.num_layers * num_directions, batch, self.hidden_size)
            if tuple(h0.shape) != expected or tuple(c0.shape) != expected:
                raise RuntimeError(f"QLSTM: expected initial states of shape {expected}, "
                                   f"got {tuple(h0.shape)} and {tuple(c0.shape)}")

        layer_input = input
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                out, h_last, c_last = self._run_direction(layer_input, layer, direction == 1, h0[index], c0[index])
                outputs.append(out)
                h_n.append(h_last)
                c_n.append(c_last)
            if num_directions == 2:
                layer_output = self.output_quantizers[layer](torch.cat(outputs, dim=2))
            else:
                layer_output = outputs[0]
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                layer_output = F.dropout(layer_output, self.dropout, training=True)
            layer_input = layer_output

        output = layer_input
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _run_direction(self, x: torch.Tensor, layer: int, reverse: bool, h: torch.Tensor, c: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer and direction over ``x`` ``[T, B, in]``; returns (``[T, B, H]`` outputs, h_T, c_T)."""
        q = self.quantizers[f"l{layer}" + ("_reverse" if reverse else "")]
        w_ih, w_hh, b_ih, b_hh = self._gate_ordered_parameters(layer, reverse, q)
        x_proj = q.input_proj_quantizer(F.linear(x, w_ih, b_ih))               # [T, B, 4H], all steps at once
        return lstm_recurrence(x_proj, h, c, w_hh, b_hh, q, reverse)

    def _gate_ordered_parameters(self, layer: int, reverse: bool, q: LSTMDirectionQuantizers):
        """Quantized ``W_ih, W_hh`` (per original gate row) and the biases, rows reordered [i, f, g, o] ->
        [i, f, o, g] so that one sigmoid and one tanh cover the gates (a gather of rows: values unchanged)."""
        suffix = f"_l{layer}" + ("_reverse" if reverse else "")
        order = _gate_order(self.hidden_size, getattr(self, "weight_ih" + suffix).device)
        w_ih = q.weight_ih_quantizer(getattr(self, "weight_ih" + suffix)).index_select(0, order)
        w_hh = q.weight_hh_quantizer(getattr(self, "weight_hh" + suffix)).index_select(0, order)
        b_ih = getattr(self, "bias_ih" + suffix).index_select(0, order) if self.bias else None
        b_hh = getattr(self, "bias_hh" + suffix).index_select(0, order) if self.bias else None
        return w_ih, w_hh, b_ih, b_hh


def lstm_recurrence(x_proj: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor,
                    b_hh: torch.Tensor | None, q: LSTMDirectionQuantizers, reverse: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The time loop of one direction (module docstring, from ``R_t`` on) on the quantized input projection
    ``x_proj`` ``[T, B, 4H]`` (gate rows in the order [i, f, o, g]); returns (``[T, B, H]``, h_T, c_T)."""
    hidden = h.shape[-1]
    # unbind (not x_proj[t]) so that backward stacks the step gradients once instead of scattering each
    # into a zero tensor of the full size
    x_steps = x_proj.unbind(0)
    steps = range(len(x_steps) - 1, -1, -1) if reverse else range(len(x_steps))
    outputs: list[torch.Tensor] = [None] * len(x_steps)                  # type: ignore[list-item]
    for t in steps:
        r = q.recurrent_proj_quantizer(F.linear(h, w_hh, b_hh))
        sigmoid_part, tanh_part = q.gates_quantizer(x_steps[t] + r).split([3 * hidden, hidden], dim=1)
        i, f, o = q.sigmoid_quantizer(torch.sigmoid(sigmoid_part)).chunk(3, dim=1)
        g = q.tanh_quantizer(torch.tanh(tanh_part))
        c = q.cell_quantizer(q.forget_cell_quantizer(f * c) + q.input_cell_quantizer(i * g))
        h = q.hidden_quantizer(o * q.cell_tanh_quantizer(torch.tanh(c)))
        outputs[t] = h
    return torch.stack(outputs), h, c


_GATE_ORDERS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _gate_order(hidden: int, device: torch.device) -> torch.Tensor:
    """Row indices taking PyTorch's gate order [i, f, g, o] to [i, f, o, g]."""
    key = (hidden, device)
    if key not in _GATE_ORDERS:
        rows = torch.arange(4 * hidden).view(4, hidden)
        _GATE_ORDERS[key] = rows[[0, 1, 3, 2]].reshape(-1).to(device)
    return _GATE_ORDERS[key]


register(nn.LSTM, QLSTM)
