"""parameter_groups: quantizer ranges get their own learning rate, and that is what lets them learn."""
import pytest
import torch

from fqss_plugin.quant import ActivationQuantizer, QuantConfig, WeightQuantizer, calibration_step, parameter_groups, \
    prepare, quantizer_parameters
from tests.toy_models import ToySeparator


def test_groups_hold_every_parameter_once_with_the_ranges_apart():
    model = prepare(ToySeparator(), QuantConfig.fqss(), encoder="encoder", decoder="decoder")
    model(torch.randn(2, 800))
    weights, ranges = parameter_groups(model, 1e-2)
    ids = [id(p) for p in weights["params"]] + [id(p) for p in ranges["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())        # each exactly once
    expected = {id(p) for m in model.modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer))
                for p in m.parameters(recurse=False)}
    assert {id(p) for p in ranges["params"]} == expected and expected
    assert {id(p) for p in quantizer_parameters(model)} == expected
    assert model.encoder.weight in [p for p in weights["params"]]          # the float weights stay in the model group
    assert ranges["lr"] == 1e-2 and ranges["weight_decay"] == 0.0 and "lr" not in weights
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-2), lr=1e-4, weight_decay=1e-5)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 1e-2]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-5, 0.0]


def test_one_group_without_quantizers_or_without_a_quantizer_lr():
    float_model = ToySeparator()
    assert len(parameter_groups(float_model, 1e-2)) == 1
    model = prepare(ToySeparator(), QuantConfig.vanilla())
    (group,) = parameter_groups(model, None)
    assert len(group["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="quantizer_lr"):
        parameter_groups(model, 0.0)
    with pytest.raises(ValueError, match="quantizer_lr"):
        QuantConfig(quantizer_lr=-1.0)


def test_a_range_learns_within_a_short_run_only_at_its_own_rate():
    """A range calibrated on an outlier is far too wide; LSQ+ shrinks it towards the MSE-optimal
    clipping. With Adam at a fine-tuning lr (1e-4) the log-step can barely move in 100 steps; at
    quantizer_lr 1e-2 it shrinks by a large factor, and the quantization error falls with it."""
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4096, generator=gen) for _ in range(100)]
    outlier = torch.cat([data[0], torch.tensor([40.0])])

    def train(quantizer_lr: float) -> tuple[float, float]:
        quantizer = ActivationQuantizer(bits=4, calib_steps=1)
        quantizer.train()(outlier)
        calibration_step(quantizer)
        start = float(quantizer.scale())
        optimizer = torch.optim.Adam(parameter_groups(quantizer, quantizer_lr), lr=1e-4)
        for x in data:
            optimizer.zero_grad()
            (quantizer(x) - x).pow(2).mean().backward()
            optimizer.step()
        error = float(torch.stack([(quantizer(x) - x).pow(2).mean() for x in data]).mean())
        return float(quantizer.scale()) / start, error

    slow_ratio, slow_error = train(1e-4)
    fast_ratio, fast_error = train(1e-2)
    assert 0.98 < slow_ratio <= 1.0
    assert fast_ratio < 0.5 and fast_error < 0.5 * slow_error
