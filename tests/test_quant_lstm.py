"""QLSTM: equivalence with nn.LSTM at 16 bits, every gate/state quantized at 8 bits, loading, training, freeze."""
import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fqss_plugin as fq
from fqss_plugin.quant import QLSTM, QMultiheadAttention, WeightQuantizer, calibration_step
from fqss_plugin.quant.recurrent import ACTIVATION_POINTS
from tests.conftest import assert_freeze_is_bit_exact, relative_error

W16A16 = fq.QuantConfig.vanilla(weight_bits=16, act_bits=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated(module, *args, config=W16A16):
    """Prepare a copy of ``module``, run one calibration step on ``args``, return it in eval mode."""
    quantized = fq.prepare(copy.deepcopy(module), config)
    with torch.no_grad():
        quantized(*args)
    calibration_step(quantized)
    return quantized.eval()


def expected_points(prefix, lstm):
    directions = ["", "_reverse"] if lstm.bidirectional else [""]
    points = []
    for layer in range(lstm.num_layers):
        for suffix in directions:
            base = f"{prefix}quantizers.l{layer}{suffix}."
            points += [base + "weight_ih_quantizer", base + "weight_hh_quantizer"]
            points += [f"{base}{point}_quantizer" for point in ACTIVATION_POINTS]
        if lstm.bidirectional:
            points.append(f"{prefix}output_quantizers.{layer}")
    return points


@pytest.mark.parametrize("batch_first, bidirectional, num_layers, with_states", [
    (True, False, 1, False), (False, True, 1, True), (True, True, 2, False), (False, False, 3, True)])
def test_qlstm_at_16_bits_matches_nn_lstm(batch_first, bidirectional, num_layers, with_states):
    lstm = nn.LSTM(6, 8, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first).eval()
    x = torch.randn(3, 12, 6) if batch_first else torch.randn(12, 3, 6)
    args = (x,)
    if with_states:
        shape = (num_layers * (2 if bidirectional else 1), 3, 8)
        args = (x, (0.5 * torch.randn(shape), 0.5 * torch.randn(shape)))
    quantized = calibrated(lstm, *args)
    assert isinstance(quantized, QLSTM) and isinstance(quantized, nn.LSTM)
    with torch.no_grad():
        out, (h, c) = quantized(*args)
        ref, (h_ref, c_ref) = lstm(*args)
    assert out.shape == ref.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    for estimate, reference in ((out, ref), (h, h_ref), (c, c_ref)):
        assert relative_error(estimate, reference) < 1e-3


def test_qlstm_unbatched_input_matches_nn_lstm():
    lstm = nn.LSTM(5, 7, bidirectional=True).eval()
    x = torch.randn(9, 5)
    quantized = calibrated(lstm, x)
    with torch.no_grad():
        out, (h, _) = quantized(x)
        ref, (h_ref, _) = lstm(x)
    assert out.shape == ref.shape == (9, 14) and h.shape == h_ref.shape == (2, 7)
    assert relative_error(out, ref) < 1e-3


def test_qlstm_loads_an_lstm_state_dict_with_upstream_names():
    lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True)
    quantized = fq.prepare(nn.LSTM(6, 8, num_layers=2, bidirectional=True), fq.QuantConfig.vanilla())
    missing, unexpected = quantized.load_state_dict(lstm.state_dict(), strict=False)
    assert unexpected == [] and missing and all("_quantizer" in key for key in missing)
    assert set(lstm.state_dict()) <= set(quantized.state_dict())
    for name, tensor in lstm.state_dict().items():
        assert torch.equal(quantized.state_dict()[name], tensor)
    # and a quantized checkpoint round-trips strictly
    quantized(torch.randn(4, 2, 6))
    restored = fq.prepare(nn.LSTM(6, 8, num_layers=2, bidirectional=True), fq.QuantConfig.vanilla())
    restored.load_state_dict(quantized.state_dict(), strict=True)


class Recurrent(nn.Module):
    """Linear (with the model's input quantizer) -> 2-layer BiLSTM; returns the output sequence."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):
        return self.lstm(self.proj(x))[0]


def test_every_gate_and_state_of_an_8_bit_lstm_is_quantized():
    model = fq.prepare(Recurrent(), fq.QuantConfig.vanilla(), encoder="proj")
    report = fq.coverage_report(model, torch.randn(2, 7, 4))
    assert report.traced and report.fully_quantized, str(report)
    points = set(report.points())
    expected = expected_points("lstm.", model.lstm)
    assert set(expected) <= points, sorted(set(expected) - points)
    assert len(expected) == 2 * 2 * 12 + 2
    # each direction has quantizers of its own (the published code shared the reverse h-quantizer)
    forward, backward = model.lstm.quantizers["l0"], model.lstm.quantizers["l0_reverse"]
    assert all(getattr(forward, f"{p}_quantizer") is not getattr(backward, f"{p}_quantizer") for p in ACTIVATION_POINTS)
    assert report.points("weight").count("lstm.quantizers.l1_reverse.weight_hh_quantizer") == 1


def test_8_bit_states_lie_on_their_grids():
    lstm = nn.LSTM(4, 6)
    quantized = calibrated(lstm, torch.randn(10, 2, 4), config=fq.QuantConfig.vanilla())
    with torch.no_grad():
        out, (h, c) = quantized(torch.randn(10, 2, 4))
    for tensor, quantizer in ((out, quantized.quantizers["l0"].hidden_quantizer),
                              (c, quantized.quantizers["l0"].cell_quantizer)):
        scale, zero_point = quantizer.qparams()
        codes = tensor / scale + zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-3)
    weight_quantizer = quantized.quantizers["l0"].weight_hh_quantizer
    weight_scale = weight_quantizer.scale()
    assert weight_scale.shape == (24,)                    # one step per gate row
    assert weight_quantizer.q_max == 63                   # 7-bit weight codes by default (exact on CPUs without VNNI)
    expected = WeightQuantizer(24, 7)                     # steps from the loaded weights, per gate row
    expected(lstm.weight_hh_l0.detach())
    assert torch.allclose(weight_scale, expected.scale(), rtol=1e-6)


def test_qlstm_trains_then_freezes_bit_exactly():
    model = fq.prepare(Recurrent(), fq.QuantConfig.vanilla(calib_steps=1), encoder="proj")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fq.attach_calibration(optimizer, model)
    x, target = torch.randn(3, 6, 4), torch.randn(3, 6, 10) * 0.1
    for _ in range(3):
        optimizer.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        optimizer.step()
    lstm = model.lstm
    assert lstm.weight_hh_l1_reverse.grad.abs().sum() > 0
    assert lstm.quantizers["l1_reverse"].cell_quantizer.log_scale.grad is not None
    assert lstm.quantizers["l0"].weight_ih_quantizer.log_scale.grad.abs().sum() > 0
    assert_freeze_is_bit_exact(model, x)


def test_qlstm_rejects_what_it_does_not_support():
    with pytest.raises(NotImplementedError, match="proj_size"):
        fq.prepare(nn.LSTM(4, 6, proj_size=3), fq.QuantConfig.vanilla())
    quantized = fq.prepare(nn.LSTM(4, 6), fq.QuantConfig.vanilla())
    packed = pack_padded_sequence(torch.randn(5, 2, 4), torch.tensor([5, 3]))
    with pytest.raises(NotImplementedError, match="PackedSequence"):
        quantized(packed)


def test_dptnet_lstm_and_attention_points_are_all_quantized():
    """asteroid's DPTNet(n_src=2) (defaults: 6 repeats of intra + inter layers, 64 channels, 4 heads,
    BiLSTM 256, chunk 100): every point of its 12 LSTMs and 12 attentions is quantized and no float
    op is left inside them (the rest of the model is the asteroid adapter's business)."""
    from asteroid.models import DPTNet
    model = fq.prepare(DPTNet(n_src=2), fq.QuantConfig.vanilla())
    report = fq.coverage_report(model, torch.randn(1, 400))
    wrapped = {name: module for name, module in model.named_modules()
               if isinstance(module, (QLSTM, QMultiheadAttention))}
    assert sum(isinstance(m, QLSTM) for m in wrapped.values()) == 12
    assert sum(isinstance(m, QMultiheadAttention) for m in wrapped.values()) == 12
    points = set(report.points())
    for name, module in wrapped.items():
        if isinstance(module, QLSTM):
            expected = expected_points(name + ".", module)
            assert len(expected) == 2 * 12 + 1
        else:
            expected = [f"{name}.{p}_quantizer" for p in ("in_proj_weight", "q", "k", "v", "scaled_q", "logits",
                                                          "softmax", "attn_v")]
            expected += [f"{name}.out_proj.weight_quantizer", f"{name}.out_proj.output_quantizer"]
        assert set(expected) <= points, sorted(set(expected) - points)
        inside = re.compile(rf" in {re.escape(name)}(\.|\)|$)")
        assert not [op for op in report.float_ops if inside.search(op)], report.float_ops
    assert not [m for m in report.float_modules if any(m.startswith(name + " ") or m.startswith(name + ".")
                                                       for name in wrapped)]
