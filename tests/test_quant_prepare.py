"""prepare / freeze / coverage_report / registry on a small ConvTasNet-like model."""
import copy

import pytest
import torch
from torch import nn

import fqss_plugin as fq
from fqss_plugin.quant import QuantizedModule, WeightQuantizer, calibration_step
from fqss_plugin.quant.layers import QConv1d, QConvTranspose1d
from tests.conftest import assert_freeze_is_bit_exact, error_after_one_calibration_step, speech_like
from tests.toy_models import ToySeparator

QUANTIZER_KEYS = ("_quantizer", "input_splitter", "output_combiner")


def prepared(config=None, model=None):
    model = model or ToySeparator()
    return fq.prepare(model, config or fq.QuantConfig.fqss(), encoder="encoder", decoder="decoder")


@pytest.mark.parametrize("preset", ["fqss", "vanilla"])
def test_model_prepared_at_16_bits_matches_the_float_model(preset):
    float_model = ToySeparator().eval()
    quantized = prepared(getattr(fq.QuantConfig, preset)(weight_bits=16, act_bits=16),
                         copy.deepcopy(float_model))
    assert error_after_one_calibration_step(float_model, quantized, speech_like(batch=3, length=4000)) < 1e-3


def test_prepare_works_in_place_and_keeps_types_and_aliases():
    model = ToySeparator()
    encoder, first_block = model.encoder, model.masker[2]
    returned = prepared(model=model)
    assert returned is model and model.encoder is encoder and model.masker[2] is first_block
    assert isinstance(model.encoder, nn.Conv1d) and isinstance(model.encoder, QConv1d)
    assert isinstance(model.decoder, QConvTranspose1d)


def test_float_state_dict_loads_strictly_except_quantizer_keys():
    float_model = ToySeparator()
    float_state = float_model.state_dict()
    quantized = prepared()
    missing, unexpected = quantized.load_state_dict(float_state, strict=False)
    assert unexpected == []
    assert missing and all(any(k in key for k in QUANTIZER_KEYS) for key in missing)
    float_keys = set(float_state)
    assert float_keys <= set(quantized.state_dict())   # upstream names unchanged
    # weight steps initialise from the *loaded* weights on the first forward pass
    quantized(speech_like(batch=1, length=2000))
    expected = WeightQuantizer(float_state["masker.1.weight"].shape[0], 7)        # 7-bit weight codes by default
    expected(float_state["masker.1.weight"])
    assert torch.allclose(quantized.masker[1].weight_quantizer.scale(), expected.scale(), rtol=1e-6)


def test_state_dict_round_trips_with_calibration_counters():
    model = prepared(fq.QuantConfig.fqss(calib_steps=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    fq.attach_calibration(optimizer, model)
    x = speech_like(batch=2, length=3000)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    state = model.state_dict()
    assert all(int(v) == 2 for k, v in state.items() if k.endswith("steps_observed"))

    restored = prepared(fq.QuantConfig.fqss(calib_steps=2))
    restored.load_state_dict(state, strict=True)
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    # resuming never re-calibrates: new data in training mode leaves the ranges alone
    restored.train()
    before = restored.masker[1].output_quantizer.qparams()
    restored(x * 100)
    assert torch.equal(restored.masker[1].output_quantizer.qparams()[0], before[0])
    assert calibration_step(restored) == 0


def test_freeze_is_bit_exact_and_exportable_ops_only():
    model = prepared(fq.QuantConfig.fqss(calib_steps=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fq.attach_calibration(optimizer, model)
    x = speech_like(batch=2, length=3000)
    for _ in range(4):                               # calibrate, then learn ranges and weights
        optimizer.zero_grad()
        (model(x) - torch.stack([x, -x], 1)).pow(2).mean().backward()
        optimizer.step()
    assert_freeze_is_bit_exact(model, x)
    assert "encoder.output_quantizer.first.zero_point" in model.state_dict()
    assert model.state_dict()["encoder.output_quantizer.first.zero_point"].dtype == torch.int32


def test_freeze_before_any_forward_pass_says_what_to_do():
    with pytest.raises(RuntimeError, match="forward pass"):
        fq.freeze(prepared())


def test_coverage_report_lists_every_output_of_the_conv_net_as_quantized():
    model = prepared()
    report = fq.coverage_report(model, speech_like(batch=2, length=2000))
    assert report.traced and report.fully_quantized, str(report)
    points = set(report.points())
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            assert f"{name}.output_quantizer" in points, name
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            assert f"{name}.weight_quantizer" in points, name
    assert "encoder.input_splitter" in points and "decoder.output_combiner" in points
    assert "verdict: fully quantized" in str(report)
    # the report ran on a copy: the model's quantizers have not seen the example
    assert not bool(model.decoder.output_quantizer.initialized)


class FunctionalResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)
        self.gru = nn.GRU(4, 4, batch_first=True)

    def forward(self, x):
        y = self.conv(x) + x                        # functional add: invisible to a module walk
        y = torch.tanh(y) * 2
        return self.gru(y.transpose(1, 2))[0]


def test_coverage_report_finds_functional_float_ops_and_unwrapped_modules():
    model = fq.prepare(FunctionalResidual(), fq.QuantConfig.vanilla())
    report = fq.coverage_report(model, torch.randn(2, 4, 10))
    assert not report.fully_quantized
    assert any("gru" in name for name in report.float_modules)
    ops = " ".join(report.float_ops)
    assert "add in <root>" in ops and "tanh in <root>" in ops
    assert "unquantized model input" in ops          # no input quantizer was attached
    assert "NOT fully quantized" in str(report)


class FloatProductIntoNorm(nn.Module):
    def __init__(self, product: nn.Module | None = None):
        super().__init__()
        self.encoder = nn.Conv1d(1, 4, 1)
        self.norm = nn.GroupNorm(1, 4)
        self.decoder = nn.Conv1d(4, 1, 1)
        self.product = product

    def forward(self, x):
        y = self.encoder(x)
        y = self.product(y, y) if self.product is not None else y * y   # functional: a float tensor...
        return self.decoder(self.norm(y))                                 # ...straight into a wrapped norm


def test_coverage_report_finds_a_float_tensor_entering_an_output_quantized_op():
    """A wrapped norm quantizes its output, not its input: an integer engine would get a float tensor."""
    def coverage(model):
        model = fq.prepare(model, fq.QuantConfig.vanilla(), encoder="encoder", decoder="decoder")
        return fq.coverage_report(model, torch.randn(2, 1, 10))

    report = coverage(FloatProductIntoNorm())
    assert report.float_ops == {"mul in <root>": 1}, str(report)
    assert coverage(FloatProductIntoNorm(product=fq.quant.Mul())).fully_quantized   # the Mul marker: quantized


def test_prepare_rejects_bad_layer_names_with_a_clear_message():
    with pytest.raises(ValueError, match="encoder='enc'.*not a submodule"):
        fq.prepare(ToySeparator(), fq.QuantConfig.fqss(), encoder="enc", decoder="decoder")
    with pytest.raises(ValueError, match="encoder='enc_activation' is a QReLU, not a weighted layer"):
        fq.prepare(ToySeparator(), fq.QuantConfig.fqss(), encoder="enc_activation", decoder="decoder")
    with pytest.raises(ValueError, match="needs both encoder= and decoder="):
        fq.prepare(ToySeparator(), fq.QuantConfig.fqss(), encoder="encoder")
    with pytest.raises(ValueError, match="in_splits"):
        fq.QuantConfig(in_splits=0)


def test_exclude_leaves_named_modules_in_float():
    model = prepared(fq.QuantConfig.fqss(exclude=("masker.2",)))
    assert not isinstance(model.masker[2].net[0], QuantizedModule)
    assert isinstance(model.masker[3].net[0], QuantizedModule)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class QSwish(fq.quant.layers.OutputQuantized, Swish):
    pass


def test_register_adds_toolkit_module_types():
    model = nn.Sequential(nn.Linear(3, 3), Swish())
    report = fq.coverage_report(fq.prepare(copy.deepcopy(model), fq.QuantConfig.vanilla()))
    assert any("Swish" in name for name in report.float_modules)
    fq.register(Swish, QSwish)
    try:
        fq.prepare(model, fq.QuantConfig.vanilla())
        assert isinstance(model[1], QSwish)
    finally:
        fq.quant.registry._WRAPPERS.pop(Swish)
    with pytest.raises(TypeError, match="must subclass"):
        fq.register(Swish, QConv1d)


def test_layer_weight_bits_give_each_named_layer_its_own_weight_precision():
    from tests.toy_models import ToySeparator
    config = fq.QuantConfig.fqss(layer_weight_bits={"decoder": 4, "encoder": 6})
    model = fq.prepare(ToySeparator(), config, encoder="encoder", decoder="decoder")
    bits = {name: m.bits for name, m in model.named_modules() if isinstance(m, fq.quant.WeightQuantizer)}
    assert bits["decoder.weight_quantizer"] == 4 and bits["encoder.weight_quantizer"] == 6
    assert all(b == config.weight_bits for n, b in bits.items() if not n.startswith(("decoder", "encoder")))
    assert {m.bits for m in model.encoder.input_splitter.weight_quantizers} == {6}
    assert fq.QuantConfig(**config.to_dict()) == config                   # round-trips through packages
    with pytest.raises(ValueError, match="'decodr', which is not a module"):
        fq.prepare(ToySeparator(), fq.QuantConfig.fqss(layer_weight_bits={"decodr": 4}), encoder="encoder",
                   decoder="decoder")
    with pytest.raises(ValueError, match="layer_weight_bits"):
        fq.QuantConfig(layer_weight_bits={"decoder": 1})


def test_allocate_weight_bits_meets_the_budget_and_spares_the_sensitive_layer(one_thread):
    from fqss_plugin.quant.mixed_precision import allocate_weight_bits, weighted_layers
    from tests.toy_models import ToySeparator
    torch.manual_seed(0)
    float_model = ToySeparator().eval()
    model = fq.prepare(copy.deepcopy(float_model), fq.QuantConfig.vanilla(weight_bits=8, act_bits=16),
                       encoder="encoder", decoder="decoder")
    x = speech_like(batch=2, length=4000)
    model.train()(x)
    calibration_step(model)
    model.eval()
    with torch.no_grad():
        target = float_model(x)

    def score(net):                                     # higher is better: SNR to the float output
        return float(10 * torch.log10(target.pow(2).sum() / (net(x) - target).pow(2).sum()))

    bits, report = allocate_weight_bits(model, score, budget_bits=6.0, candidates=(8, 6, 4))
    assert set(bits) == set(weighted_layers(model)) and report["average_bits"] <= 6.0
    # the layer that loses most at 4 bits is not among the first lowered to 4 bits
    worst = max(report["loss"], key=lambda name: report["loss"][name][4])
    assert bits[worst] >= min(bits.values())
    assert bits[worst] > 4 or all(b == 4 for b in bits.values())
    requantized = fq.prepare(copy.deepcopy(float_model), fq.QuantConfig.vanilla(layer_weight_bits=bits),
                             encoder="encoder", decoder="decoder")
    assert {n: m.weight_quantizer.bits for n, m in weighted_layers(requantized).items()} == bits
