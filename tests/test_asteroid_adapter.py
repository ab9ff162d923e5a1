"""Asteroid adapter: prepare fully covers Asteroid's own ConvTasNet."""
import copy

import pytest
import torch
from asteroid.models import ConvTasNet, DPTNet

import fqss_plugin as fq
from fqss_plugin.asteroid import QFilterbankDecoder, QFilterbankEncoder, prepare_model
from tests.conftest import error_after_one_calibration_step, speech_like


def tiny_convtasnet():
    return ConvTasNet(n_src=2, n_blocks=3, n_repeats=1, bn_chan=16, hid_chan=32, skip_chan=16, n_filters=32,
                      kernel_size=16, stride=8)


@pytest.mark.parametrize("preset", ["fqss", "vanilla"])
def test_convtasnet_is_fully_quantized(preset):
    model = prepare_model(tiny_convtasnet(), getattr(fq.QuantConfig, preset)())
    report = fq.coverage_report(model, speech_like(batch=2, length=3000))
    assert report.fully_quantized, str(report)
    assert isinstance(model.encoder, QFilterbankEncoder) and isinstance(model.decoder, QFilterbankDecoder)
    points = report.points()
    assert "masker.residual_adds.2.output_quantizer" in points and "masker.skip_adds.1.output_quantizer" in points
    assert "decoder.input_quantizer" in points            # the mask product
    assert "encoder.weight_quantizer" in points            # the filterbank's filters


def test_convtasnet_at_16_bits_matches_float_and_keeps_asteroid_serialisation():
    float_model = tiny_convtasnet().eval()
    model = prepare_model(copy.deepcopy(float_model), fq.QuantConfig.fqss(weight_bits=16, act_bits=16))
    assert error_after_one_calibration_step(float_model, model, speech_like(batch=2, length=3000)) < 1e-3
    package = model.serialize()               # Asteroid's package; its own loader rebuilds the quantized model
    assert package["model_name"] == "FQSSConvTasNet" and isinstance(model, ConvTasNet)
    reloaded = ConvTasNet.from_pretrained(package)
    assert type(reloaded) is type(model) and reloaded.fqss_config == model.fqss_config
    x = speech_like(batch=1, length=3000)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), model.eval()(x))
    missing, unexpected = model.load_state_dict(float_model.state_dict(), strict=False)
    assert unexpected == [] and all("quantizer" in k or "input_splitter" in k for k in missing)


def tiny_dptnet():
    return DPTNet(n_src=2, n_filters=16, kernel_size=16, stride=8, n_heads=2, ff_hid=16, chunk_size=20, hop_size=10,
                  n_repeats=1, bn_chan=16, in_chan=16)


def test_dptnet_is_fully_quantized_including_attention_and_lstm_internals():
    model = prepare_model(tiny_dptnet(), fq.QuantConfig.fqss())
    report = fq.coverage_report(model, speech_like(batch=2, length=2000))
    assert report.fully_quantized, str(report)
    points = report.points()
    for point in ("masker.overlap_add_quantizer", "masker.gate.output_quantizer",
                  "masker.layers.0.0.attention_residual.output_quantizer",
                  "masker.layers.0.1.feedforward_residual.output_quantizer"):
        assert point in points, point
    assert sum(".recurrent." in p for p in points) >= 2 * 12 and sum(".mha." in p for p in points) >= 2 * 8


def test_dptnet_at_16_bits_matches_float():
    float_model = tiny_dptnet().eval()
    model = prepare_model(copy.deepcopy(float_model), fq.QuantConfig.fqss(weight_bits=16, act_bits=16))
    assert error_after_one_calibration_step(float_model, model, speech_like(batch=2, length=2000)) < 1e-3
