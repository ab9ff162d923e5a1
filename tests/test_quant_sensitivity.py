"""Sensitivity analysis: groups of quantizers run as identities, grouped by role."""
import copy

import pytest
import torch

import fqss_plugin as fq
from fqss_plugin.asteroid import prepare_model
from fqss_plugin.quant import ActivationQuantizer, WeightQuantizer
from fqss_plugin.quant.sensitivity import bypassed, modules_named, quantizer_groups, quantizer_places
from tests.conftest import error_after_one_calibration_step, relative_error, speech_like
from tests.test_asteroid_adapter import tiny_convtasnet


@pytest.fixture(scope="module")
def models():
    float_model = tiny_convtasnet().eval()
    model = prepare_model(copy.deepcopy(float_model), fq.QuantConfig.fqss(calib_steps=1))
    error_after_one_calibration_step(float_model, model, speech_like(batch=2, length=3000))
    return float_model, model.eval()


def test_every_quantizer_is_in_exactly_one_role_group(models):
    _, model = models
    groups = quantizer_groups(model)
    names = [name for members in groups.values() for name in members]
    quantizers = [n for n, m in model.named_modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer))]
    assert sorted(names) == sorted(quantizers) and len(set(names)) == len(names)
    assert len(groups["QGlobLN outputs"]) == 1 + 2 * 3                  # bottleneck + 2 per block
    assert len(groups["QConv1d (depthwise) outputs"]) == 3
    assert groups["QFilterbankDecoder inputs"] == ["decoder.input_quantizer.first"]   # the mask product
    assert "encoder.input_splitter.weight_quantizers.0" in groups["QFilterbankEncoder weights"]


def test_places_partition_the_quantizers_by_the_submodule_holding_them(models):
    _, model = models
    places, layers = quantizer_places(model), quantizer_places(model, depth=3)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer)))
    for grouping in (places, layers):
        assert sorted(n for members in grouping.values() for n in members) == names
    assert set(places) == {"encoder", "masker", "decoder"}
    assert all(n.startswith("masker.") for n in places["masker"])
    assert len(layers) > len(places) and all(len(key.split(".")) <= 3 for key in layers)
    with pytest.raises(ValueError, match="depth"):
        quantizer_places(model, depth=0)


def test_bypassing_every_quantizer_gives_back_the_float_model_and_nothing_sticks(models):
    float_model, model = models
    x = speech_like(batch=2, length=3000, seed=1)
    with torch.no_grad():
        quantized = model(x)
        with bypassed(modules_named(model, [n for names in quantizer_groups(model).values() for n in names])):
            unquantized = model(x)
        again = model(x)
        reference = float_model(x)
    # left: the 2 x 8-bit input split and the output residual, both ~16-bit
    assert relative_error(unquantized, reference) < 1e-3 < relative_error(quantized, reference)
    assert torch.equal(again, quantized)


def test_bypassed_takes_quantizers_only(models):
    _, model = models
    with pytest.raises(TypeError, match="ActivationQuantizer or WeightQuantizer"):
        with bypassed([model.decoder]):
            pass
    with pytest.raises(KeyError, match="no module named nonexistent"):
        modules_named(model, ["nonexistent"])
