"""InputSplitter / OutputCombiner: precision of the 8-bit signal path and its initialisation."""
import copy

import torch
from torch import nn

import fqss_plugin as fq
from fqss_plugin.quant import calibration_step
from fqss_plugin.quant.signal_io import (InputSplitter, SignalScale, combine_signals, grid_step, residual_gain,
                                         split_signal)
from tests.conftest import snr_db, speech_like
from tests.toy_models import ToySeparator


def test_split_signals_are_on_the_signed_8_bit_grid():
    x = torch.rand(1000) * 2 * (1 - grid_step(8)) - (1 - grid_step(8))
    for signal in split_signal(x, bits=8, splits=3):
        codes = signal / grid_step(8)
        assert torch.equal(codes, codes.round())
        assert codes.min() >= -128 and codes.max() <= 127


def test_split_and_combine_round_trip_speech_at_more_than_80_db():
    x = speech_like(batch=3, length=16000) * torch.tensor([[0.01], [1.0], [30.0]])   # very different levels
    scale = SignalScale()
    normalized = scale.normalize(x, peak=1 - grid_step(8))
    rebuilt = scale.denormalize(combine_signals(split_signal(normalized, bits=8, splits=2), bits=8))
    for b in range(3):
        assert snr_db(rebuilt[b], x[b]) >= 80, b
    single = scale.denormalize(combine_signals(split_signal(normalized, bits=8, splits=1), bits=8))
    assert snr_db(single[1], x[1]) < 50                     # one 8-bit signal is far from enough


def test_more_splits_give_more_precision_for_other_bit_widths():
    x = speech_like(batch=1, length=8000)[0]
    x = x / x.abs().max() * (1 - grid_step(6))
    snrs = [snr_db(combine_signals(split_signal(x, 6, n), 6), x) for n in (1, 2, 3)]
    assert snrs[0] + 25 < snrs[1] and snrs[1] + 25 < snrs[2]


def test_widened_encoder_reproduces_the_float_encoder_at_init_within_one_lsb():
    float_model = ToySeparator()
    model = fq.prepare(copy.deepcopy(float_model), fq.QuantConfig.fqss(weight_bits=16, encoder_out_splits=1),
                       encoder="encoder", decoder="decoder")
    x = speech_like(batch=2, length=4000)
    model(x)
    encoder = model.encoder
    gain = residual_gain(8)
    assert torch.allclose(encoder.input_splitter.extra_weight[0], float_model.encoder.weight * gain)
    with torch.no_grad():
        theta = x.abs().amax(dim=1, keepdim=True) / (1 - grid_step(8))
        expected = float_model.encoder((x / theta).unsqueeze(1))
        got = encoder.eval()(x.unsqueeze(1))
    lsb = encoder.output_quantizer.qparams()[0]
    assert (got - expected).abs().max() <= lsb * 1.0001


def test_per_example_normalisation_makes_batching_irrelevant(one_thread):
    model = fq.prepare(ToySeparator(), fq.QuantConfig.fqss(), encoder="encoder", decoder="decoder")
    x = speech_like(batch=3, length=4000) * torch.tensor([[0.1], [1.0], [5.0]])
    model(x)
    calibration_step(model)
    model.eval()
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[b:b + 1]) for b in range(3)])
    for b in range(3):          # identical up to rare 1-LSB flips from float summation order (more of them with threads)
        assert snr_db(alone[b], together[b]) > 60, b


def test_output_combiner_gives_a_16_bit_output_from_two_8_bit_outputs():
    decoder = nn.ConvTranspose1d(16, 1, 16, stride=8, bias=False)
    latent = torch.relu(torch.randn(2, 16, 200))
    reference = decoder(latent).detach()
    snrs = {}
    for splits in (1, 2):
        model = nn.Sequential(copy.deepcopy(decoder))
        fq.prepare(model, fq.QuantConfig(weight_bits=16, in_splits=1, out_splits=splits), decoder="0")
        model(latent)
        calibration_step(model)
        with torch.no_grad():
            snrs[splits] = snr_db(model.eval()(latent), reference)
    assert snrs[1] < 55 and snrs[2] > snrs[1] + 40, snrs


def test_output_combiner_outputs_are_8_bit_tensors():
    model = fq.prepare(nn.Sequential(nn.Conv1d(1, 4, 3), nn.Conv1d(4, 1, 3)), fq.QuantConfig(), encoder="0",
                       decoder="1")
    x = speech_like(batch=2, length=1000).unsqueeze(1)
    model(x)
    outputs = []
    original = torch.fake_quantize_per_tensor_affine

    def spy(tensor, scale, zero_point, q_min, q_max):
        result = original(tensor, scale, zero_point, q_min, q_max)
        outputs.append((result, scale, zero_point, q_min, q_max))
        return result

    torch.fake_quantize_per_tensor_affine = spy
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        torch.fake_quantize_per_tensor_affine = original
    residual, scale, zero_point, q_min, q_max = outputs[-1]   # the combiner's second output
    codes = residual / scale + zero_point
    assert (q_min, q_max) == (0, 255) and torch.allclose(codes, codes.round(), atol=1e-3)


def test_input_splitter_needs_two_splits():
    import pytest
    with pytest.raises(ValueError, match="at least 2 splits"):
        InputSplitter(torch.zeros(4, 1, 3), 0, fq.QuantConfig(in_splits=1), None)


def _calibrated_split(splits: int, x: torch.Tensor) -> nn.Module:
    from fqss_plugin.quant import ActivationQuantizer, SplitActivationQuantizer
    first = ActivationQuantizer(bits=8, calib_steps=1)
    quantizer = SplitActivationQuantizer(first, 8, splits) if splits > 1 else first
    quantizer.train()(x)
    first.end_calibration_step()
    return quantizer.eval()


def test_split_activation_on_two_8_bit_tensors_has_16_bit_precision():
    x = torch.relu(torch.randn(4, 32, 500)) ** 2               # heavy-tailed, like a masked representation
    single, split = _calibrated_split(1, x), _calibrated_split(2, x)
    with torch.no_grad():
        step = float(split.first.qparams()[0])
        assert (split(x) - x).abs().max() <= step * residual_gain(8) / 2 * 1.001   # half a residual step
        assert snr_db(split(x), x) > snr_db(single(x), x) + 40
        first, residual = split.parts(x)
        assert torch.equal(first, single(x))                   # the first part is the plain 8-bit tensor
        codes = residual / step + 128
        assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= 0 and codes.max() <= 255


def test_fqss_decoder_runs_once_per_8_bit_part_of_the_mask_product():
    from fqss_plugin.asteroid import prepare_model
    from fqss_plugin.quant import ActivationQuantizer, SplitActivationQuantizer
    from tests.test_asteroid_adapter import tiny_convtasnet
    model = prepare_model(tiny_convtasnet(), fq.QuantConfig.fqss(calib_steps=1))
    assert isinstance(model.decoder.input_quantizer, SplitActivationQuantizer)
    vanilla = prepare_model(tiny_convtasnet(), fq.QuantConfig.vanilla())
    assert type(vanilla.decoder.input_quantizer) is ActivationQuantizer
    model(speech_like(batch=2, length=3000))
    calibration_step(model)
    decoder = model.decoder.eval()
    latent = torch.relu(torch.randn(2, 2, 32, 300))
    calls = []
    linear_op = decoder.linear_op
    decoder.linear_op = lambda x, weight, bias: calls.append(x) or linear_op(x, weight, bias)
    with torch.no_grad():
        per_part = decoder(latent)
        assert len(calls) == 2                                 # one (integer) op per 8-bit part
        once = linear_op(decoder.input_quantizer(latent), decoder.weight_quantizer(decoder.weight), None)
    # sum of the per-part decoder outputs = decoder of the summed parts, up to float summation order
    assert (decoder.output_combiner(once, decoder.output_quantizer) - per_part).abs().max() < 1e-5


def test_a_checkpoint_with_another_number_of_decoder_input_splits_does_not_load():
    from fqss_plugin.asteroid import prepare_model
    from tests.test_asteroid_adapter import tiny_convtasnet
    two = prepare_model(tiny_convtasnet(), fq.QuantConfig.fqss())
    one = prepare_model(tiny_convtasnet(), fq.QuantConfig.fqss(decoder_in_splits=1))
    import pytest
    with pytest.raises(RuntimeError, match="input_quantizer"):
        one.load_state_dict(two.state_dict())
    with pytest.raises(RuntimeError, match="input_quantizer"):
        two.load_state_dict(one.state_dict())


def test_encoder_output_on_two_8_bit_tensors_is_exported_with_both_parts(tmp_path):
    from fqss_plugin.asteroid import prepare_model
    from fqss_plugin.export import parity_report, to_onnx
    from fqss_plugin.quant import ActivationQuantizer, SplitActivationQuantizer
    from tests.test_asteroid_adapter import tiny_convtasnet
    torch.manual_seed(0)
    model = prepare_model(tiny_convtasnet(), fq.QuantConfig.fqss(calib_steps=2))     # encoder_out_splits 2
    assert isinstance(model.encoder.output_quantizer, SplitActivationQuantizer)
    one = fq.QuantConfig.fqss(encoder_out_splits=1)
    assert type(prepare_model(tiny_convtasnet(), one).encoder.output_quantizer) is ActivationQuantizer
    mix = speech_like(batch=2, length=3000)
    for _ in range(2):
        model(mix)
        calibration_step(model)
    model.eval()
    from fqss_plugin.quant.sensitivity import bypassed
    with torch.no_grad():
        with bypassed([model.encoder.output_quantizer.first]):   # the encoder's accumulator, unquantized
            reference = model.forward_encoder(mix)
        split = model.forward_encoder(mix)
        model.encoder.output_quantizer.splits = 1              # the same quantizer, first part only
        single = model.forward_encoder(mix)
        model.encoder.output_quantizer.splits = 2
    assert snr_db(split, reference) > snr_db(single, reference) + 40
    result = to_onnx(model, tmp_path / "split.onnx")
    parity = parity_report(model, result.path, mix)
    assert parity.snr_db >= 40, str(parity)
    assert "encoder.output_quantizer.residual_quantizers.0" in {q.name for q in parity.quantizers}
