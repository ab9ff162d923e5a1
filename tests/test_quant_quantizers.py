"""ActivationQuantizer / WeightQuantizer: grids, gradients, range safety, calibration life cycle."""
import copy

import pytest
import torch
from torch import nn

from fqss_plugin.quant import ActivationQuantizer, WeightQuantizer, attach_calibration, calibration_step
from fqss_plugin.quant.functional import MIN_SCALE


def test_activation_output_is_on_an_integer_grid_that_contains_zero():
    quantizer = ActivationQuantizer(bits=8)
    x = torch.randn(4, 1000) * 3 + 1
    y = quantizer(x)
    scale, zero_point = quantizer.qparams()
    codes = y / scale + zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 255
    assert quantizer(torch.zeros(7)).eq(0).all()           # 0 is exactly representable
    assert len(torch.unique(y)) <= 256


def test_activation_range_covers_the_calibration_batch():
    quantizer = ActivationQuantizer(bits=8)
    x = torch.linspace(-1.0, 3.0, 4001)
    y = quantizer(x)
    scale, _ = quantizer.qparams()
    assert (y - x).abs().max() <= scale / 2 + 1e-6          # nothing clipped, error <= LSB/2


def test_weight_quantizer_is_symmetric_per_channel_with_absmax_over_127():
    w = torch.randn(6, 3, 5)
    quantizer = WeightQuantizer(num_channels=6, bits=8, axis=0, init="max")
    wq = quantizer(w)
    expected_scale = w.abs().amax(dim=(1, 2)) / 127
    assert torch.allclose(quantizer.scale(), expected_scale, rtol=1e-6)
    codes = wq / expected_scale.view(-1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().abs().max() == 127 and codes.round().min() >= -128


def test_weight_quantizer_axis_1_for_transposed_convs():
    conv = nn.ConvTranspose1d(4, 3, 8)                     # weight [C_in=4, C_out=3, 8]
    quantizer = WeightQuantizer(num_channels=3, bits=8, axis=1, init="max")
    quantizer(conv.weight)
    assert torch.allclose(quantizer.scale(), conv.weight.detach().abs().amax(dim=(0, 2)) / 127, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_weight_init_clips_where_the_error_is_least(bits):
    torch.manual_seed(0)
    w = torch.randn(8, 64, 3)
    w[:, 0, 0] = 6.0                                        # one outlier per channel, as trained weights have
    by_max, by_mse = WeightQuantizer(8, bits, init="max"), WeightQuantizer(8, bits)
    error_max = (by_max(w) - w).pow(2).sum(dim=(1, 2))
    error_mse = (by_mse(w) - w).pow(2).sum(dim=(1, 2))
    assert (error_mse <= error_max).all()
    assert (by_mse.scale() <= by_max.scale() * (1 + 1e-6)).all()        # it only ever clips
    if bits == 4:                                           # a coarse grid: clipping the outlier pays, per channel
        assert (error_mse < 0.9 * error_max).all() and (by_mse.scale() < by_max.scale()).all()
    scale = WeightQuantizer(3, 8)                           # one value per channel (a LayerScale): exact
    values = torch.tensor([0.3, -1e-3, 2.0])
    assert torch.allclose(scale(values), values, rtol=1e-6)


def test_weight_init_is_a_config_setting():
    from fqss_plugin import QuantConfig
    from fqss_plugin.quant.layers import QConv1d
    conv = nn.Conv1d(2, 4, 3)
    assert QConv1d.convert_(copy.deepcopy(conv), QuantConfig(weight_init="max")).weight_quantizer.init == "max"
    assert QConv1d.convert_(conv, QuantConfig()).weight_quantizer.init == "mse"
    with pytest.raises(ValueError, match="weight_init"):
        QuantConfig(weight_init="minmax")


def test_gradients_reach_step_and_zero_point():
    quantizer = ActivationQuantizer(bits=4, calib_steps=0)
    quantizer(torch.linspace(0, 1, 100))                  # initialise the range on [0, 1]
    x = torch.linspace(-0.5, 2.0, 500, requires_grad=True)  # clipped on both sides
    loss = (quantizer(x) - x).pow(2).sum()
    loss.backward()
    assert quantizer.log_scale.grad is not None and quantizer.log_scale.grad.abs() > 0
    assert quantizer.zero_point.grad is not None and quantizer.zero_point.grad.abs() > 0
    inside = (x.grad != 0)
    assert inside.any() and not inside.all()              # STE: no gradient where clipped

    weights = WeightQuantizer(num_channels=3, bits=4)
    w = torch.randn(3, 10, requires_grad=True)
    weights(w).pow(2).sum().backward()
    assert weights.log_scale.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_learning_the_step_reduces_clipping_error():
    quantizer = ActivationQuantizer(bits=4, calib_steps=0)
    quantizer(torch.linspace(-0.2, 0.2, 100))             # range far too narrow for the data below
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.05)
    x = torch.randn(2000)
    first = None
    for _ in range(60):
        loss = (quantizer(x) - x).pow(2).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_ranges_never_invert_or_divide_by_zero_under_adversarial_parameters():
    quantizer = ActivationQuantizer(bits=8, calib_steps=0)
    quantizer(torch.randn(100))
    x = torch.randn(1000)
    for log_scale, zero_point in [(-1e4, 0.0), (1e4, 0.0), (0.0, 1e9), (0.0, -1e9), (-50.0, 300.0)]:
        with torch.no_grad():
            quantizer.log_scale.fill_(log_scale)
            quantizer.zero_point.fill_(zero_point)
        y = quantizer(x)
        scale, zp = quantizer.qparams()
        assert torch.isfinite(y).all()
        assert scale > 0 and 0 <= int(zp) <= 255
        low, high = -int(zp) * scale, (255 - int(zp)) * scale
        assert low <= 0 <= high and low < high

    # a wildly large learning rate cannot break the range either
    quantizer = ActivationQuantizer(bits=8, calib_steps=0)
    quantizer(torch.randn(100))
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=1e6)
    for _ in range(5):
        optimizer.zero_grad()
        (quantizer(x * 10) - x * 10).pow(2).sum().backward()
        optimizer.step()
        assert torch.isfinite(quantizer(x)).all() and quantizer.scale() >= MIN_SCALE


def test_silence_and_constant_inputs_give_finite_outputs():
    for value in (0.0, 0.5, -3.0):
        quantizer = ActivationQuantizer(bits=8)
        x = torch.full((2, 100), value)
        y = quantizer(x)
        assert torch.isfinite(y).all()
        assert torch.allclose(y, x, atol=abs(value) / 255 + 1e-6)
    weights = WeightQuantizer(num_channels=2)
    assert weights(torch.zeros(2, 5)).eq(0).all()


def test_mse_calibration_clips_tails_that_minmax_keeps():
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))   # 4-bit optimum clips near 5b, max is ~10b
    minmax = ActivationQuantizer(bits=4, method="ema")
    mse = ActivationQuantizer(bits=4, method="mse")
    minmax(x), mse(x)
    assert mse.qparams()[0] < 0.7 * minmax.qparams()[0]
    assert (mse(x) - x).pow(2).mean() < 0.7 * (minmax(x) - x).pow(2).mean()


def test_calibration_counts_optimizer_steps_not_forward_calls():
    model = nn.Sequential(nn.Linear(4, 4))
    quantizer = ActivationQuantizer(bits=8, calib_steps=3)
    model.append(quantizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    attach_calibration(optimizer, model)
    for step in range(3):
        for _ in range(4):                                 # e.g. gradient accumulation
            model(torch.randn(8, 4)).sum().backward()
        assert int(quantizer.steps_observed) == step
        optimizer.step()
    assert int(quantizer.steps_observed) == 3 and not quantizer.calibrating
    # calibration over: a huge batch in training mode no longer moves the range ...
    scale_before = quantizer.qparams()[0].clone()
    model(torch.randn(8, 4) * 1000)
    assert torch.equal(quantizer.qparams()[0], scale_before)
    # ... and the range is now learned
    model(torch.randn(8, 4) * 1000).sum().backward()
    assert quantizer.log_scale.grad is not None


def test_a_training_loop_that_never_ends_calibration_steps_is_warned(recwarn):
    """A loop without calibration_step (a stock SpeechBrain Brain with fqss's hparams lines) would train with ranges
    that never commit: the quantizer says so once, and a loop that does call it hears nothing."""
    import pytest
    quantizer = ActivationQuantizer(bits=8, calib_steps=10).train()
    for _ in range(ActivationQuantizer.UNCOMMITTED_WARNING - 1):
        quantizer(torch.randn(16))
    assert not [w for w in recwarn if "calibration_step" in str(w.message)]
    with pytest.warns(UserWarning, match="no optimizer step has ended its calibration: call fqss_plugin.calibration_step"):
        quantizer(torch.randn(16))
    committed = ActivationQuantizer(bits=8, calib_steps=10 ** 6).train()
    recwarn.clear()
    for _ in range(2 * ActivationQuantizer.UNCOMMITTED_WARNING):
        committed(torch.randn(16))
        committed.end_calibration_step()
    assert not [w for w in recwarn if "calibration_step" in str(w.message)]


def test_eval_mode_does_not_calibrate_an_initialised_quantizer():
    quantizer = ActivationQuantizer(bits=8, calib_steps=10)
    quantizer(torch.randn(100))
    before = quantizer.running_max.clone()
    quantizer.eval()
    quantizer(torch.randn(100) * 50)
    assert torch.equal(quantizer.running_max, before)


def test_calibration_step_ignores_quantizers_that_saw_no_data():
    model = nn.Sequential(ActivationQuantizer(calib_steps=2))
    calibration_step(model)
    assert int(model[0].steps_observed) == 0


def test_training_forward_is_bit_identical_to_the_torch_kernel():
    from fqss_plugin.quant.functional import fake_quantize_per_tensor
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        x = torch.randn(5000, generator=gen) * torch.rand(1, generator=gen) * 10
        scale = torch.rand(1, generator=gen) * 0.1 + 1e-4
        zero_point = torch.randint(0, 256, (1,), generator=gen).float()
        ours = fake_quantize_per_tensor(x, scale, zero_point, 0, 255)
        theirs = torch.fake_quantize_per_tensor_affine(x, scale, zero_point.int(), 0, 255)
        assert torch.equal(ours, theirs)


def test_step_gradient_points_the_way_a_finite_difference_does():
    quantizer = ActivationQuantizer(bits=4, calib_steps=0)
    quantizer(torch.linspace(-1, 1, 100))
    x = torch.randn(4000) * 2

    def loss():
        return (quantizer(x) - x).pow(2).sum()
    loss().backward()
    # LSQ's gradient is a straight-through estimate, not the true derivative of a step function;
    # its sign must still agree with the direction that reduces the clipping-dominated error.
    with torch.no_grad():
        base = loss().item()
        quantizer.log_scale += 0.05
        wider = loss().item()
    assert (wider < base) == (quantizer.log_scale.grad.item() < 0)


def test_lsq_gradients_match_autograd_of_the_straight_through_formula():
    from fqss_plugin.quant.functional import fake_quantize_per_tensor
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3000, generator=gen) * 2).requires_grad_()
    scale = torch.tensor(0.02, requires_grad=True)
    zero_point = torch.tensor(100.4, requires_grad=True)
    codes = x.detach() * 50 + 100
    # values within half a step of the range ends are "inside" for the kernel's rounded codes but
    # float-noise-dependent for the formula below: leave them out of the comparison
    boundary = (codes.abs() <= 0.5) | ((codes - 255).abs() <= 0.5)
    upstream = torch.randn(3000, generator=gen) * ~boundary
    fake_quantize_per_tensor(x, scale, zero_point, 0, 255, 0.5).backward(upstream)
    ours = (x.grad.clone(), scale.grad.clone(), zero_point.grad.clone())

    x.grad = scale.grad = zero_point.grad = None
    u = x * (1.0 / scale)                                              # the kernel's order
    rounded = u + (torch.round(u) - u).detach()                       # straight-through round
    z = zero_point + (torch.round(zero_point) - zero_point).detach()
    y = (torch.clamp(rounded + z, 0, 255) - z) * scale
    (y * upstream).sum().backward()
    assert torch.allclose(ours[0], x.grad)
    assert torch.allclose(ours[1], scale.grad * 0.5, rtol=1e-4)
    assert torch.allclose(ours[2], zero_point.grad * 0.5, rtol=1e-4)


def test_training_under_autocast_warns_once(monkeypatch):
    from fqss_plugin.quant.quantizers import ActivationQuantizer
    monkeypatch.setattr(ActivationQuantizer, "_warned_autocast", False)
    quantizer = ActivationQuantizer().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="autocast"):
            quantizer(torch.randn(8))
    assert ActivationQuantizer._warned_autocast


def test_mse_calibration_samples_stay_in_range_on_tensors_past_float32_precision():
    """The evenly spaced samples of MSE calibration end exactly at the last element, also past 2^24 elements
    (a float32 linspace rounds up to an index one past the end on tensors such as HTDemucs' [4, 8, 128, 7482])."""
    from fqss_plugin.quant.quantizers import evenly_spaced
    for numel in (4096, 4097, 16_777_217, 30_647_296, 2**31 + 11):
        index = evenly_spaced(numel, 4096)
        assert index[0] == 0 and index[-1] == numel - 1 and bool((index[1:] > index[:-1]).all())
