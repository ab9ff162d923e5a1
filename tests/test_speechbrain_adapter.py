"""SpeechBrain adapter: SepFormer fully quantized, quantize_inplace in hyperpyyaml, transfer hook,
reset_layer_recursively, and the inference package reloaded through SepformerSeparation.from_hparams."""
import copy
import io

import pytest
import soundfile as sf
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.inference.separation import SepformerSeparation
from speechbrain.lobes.models.dual_path import Decoder, Dual_Path_Model, Encoder, SBTransformerBlock
from speechbrain.utils.checkpoints import Checkpointer

import fqss_plugin as fq
from fqss_plugin.quant import registry
from fqss_plugin.quant.attention import ACTIVATION_POINTS
from fqss_plugin.quant.quantizers import ActivationQuantizer, WeightQuantizer
from fqss_plugin.speechbrain import (FQSSBrainMixin, QDual_Path_Model, QSBDecoder, QSBEncoder,
                                     QuantizedSepformerSeparation, is_quantized, quantize_inplace,
                                     save_pretrained_separator, transfer_into_quantized)
from tests.conftest import speech_like

TINY = dict(channels=16, nhead=2, d_ffn=32, layers=1, dual_layers=1, K=20)
"""The tiny SepFormer of the tests; ``TINY_OVERRIDES`` are the same sizes as recipe command-line flags."""
TINY_OVERRIDES = ["--N_encoder_out", "16", "--out_channels", "16", "--d_ffn", "32", "--nhead", "2",
                  "--num_transformer_layers", "1", "--num_dual_layers", "1", "--chunk_size", "20"]


def tiny_modules(seed: int = 0, channels=16, nhead=2, d_ffn=32, layers=1, dual_layers=1, K=20) -> dict:
    """A SepFormer (the recipe's architecture) small enough for unit tests."""
    torch.manual_seed(seed)

    def block():
        return SBTransformerBlock(layers, channels, nhead, d_ffn=d_ffn, dropout=0, use_positional_encoding=True,
                                  norm_before=True)

    return {"encoder": Encoder(kernel_size=16, out_channels=channels),
            "masknet": Dual_Path_Model(channels, channels, block(), block(), num_layers=dual_layers, K=K,
                                       num_spks=2, norm="ln", linear_layer_after_inter_intra=False),
            "decoder": Decoder(in_channels=channels, out_channels=1, kernel_size=16, stride=8, bias=False)}


class Separator(torch.nn.Module):
    """``SepformerSeparation.separate_batch`` as a module (``[B, T] -> [B, T', 2]``), for coverage_report."""

    def __init__(self, modules):
        super().__init__()
        self.encoder, self.masknet, self.decoder = modules["encoder"], modules["masknet"], modules["decoder"]

    def forward(self, mix):
        mix_w = self.encoder(mix)
        sep_h = torch.stack([mix_w] * 2) * self.masknet(mix_w)
        return torch.stack([self.decoder(sep_h[i]) for i in range(2)], dim=-1)


def calibrate(model, x):
    with torch.no_grad():
        model.train()
        model(x)
        fq.calibration_step(model)
    return model.eval()


@pytest.mark.parametrize("preset", ["fqss", "vanilla"])
def test_sepformer_is_fully_quantized_every_attention_point_included(preset):
    modules = tiny_modules(dual_layers=2)
    quantize_inplace(modules, getattr(fq.QuantConfig, preset)(), keep_float_teacher=False)
    report = fq.coverage_report(Separator(modules), speech_like(batch=2, length=1600))
    assert report.traced and report.fully_quantized, str(report)
    points = set(report.points())
    for stage in range(2):
        block = f"masknet.dual_mdl.{stage}"
        assert {f"{block}.intra_residual.output_quantizer", f"{block}.inter_residual.output_quantizer",
                f"{block}.intra_norm.output_quantizer", f"{block}.inter_norm.output_quantizer"} <= points
        for path in ("intra_mdl", "inter_mdl"):
            layer = f"{block}.{path}.mdl.layers.0"
            attention = {f"{layer}.self_att.att.{p}_quantizer" for p in ACTIVATION_POINTS}
            attention |= {f"{layer}.self_att.att.in_proj_weight_quantizer",
                          f"{layer}.self_att.att.out_proj.weight_quantizer",
                          f"{layer}.self_att.att.out_proj.output_quantizer"}
            ffn = {f"{layer}.pos_ffn.ffn.{i}.{q}" for i, q in
                   [(0, "weight_quantizer"), (0, "output_quantizer"), (1, "output_quantizer"),
                    (3, "weight_quantizer"), (3, "output_quantizer")]}
            norms_and_sums = {f"{layer}.norm1.norm.output_quantizer", f"{layer}.norm2.norm.output_quantizer",
                              f"{layer}.attention_residual.output_quantizer", f"{layer}.ffn_residual.output_quantizer",
                              f"{block}.{path}.mdl.norm.norm.output_quantizer",
                              f"{block}.{path}.pos_enc.output_quantizer", f"{block}.{path}.pos_add.output_quantizer"}
            assert attention | ffn | norms_and_sums <= points, sorted(attention | ffn | norms_and_sums - points)
    assert {"encoder.relu.output_quantizer", "masknet.gate_product.output_quantizer",
            "masknet.overlap_add.output_quantizer", "decoder.input_quantizer"} <= points   # mix x mask product
    if preset == "fqss":
        assert report.points("input") == ["encoder.conv1d.input_splitter"]
        assert report.points("output") == ["decoder.output_combiner"]
    else:
        assert "encoder.conv1d.input_quantizer" in points and not report.points("output")


def test_without_the_adapter_the_functional_sums_stay_float(monkeypatch):
    """What the SpeechBrain wrappers add: the core alone leaves SepFormer's functional ops in float."""
    for float_type in (Encoder, Decoder, Dual_Path_Model, SBTransformerBlock):
        monkeypatch.delitem(registry._WRAPPERS, float_type)
    from speechbrain.lobes.models.dual_path import Dual_Computation_Block
    from speechbrain.lobes.models.transformer.Transformer import PositionalEncoding, TransformerEncoderLayer
    for float_type in (Dual_Computation_Block, TransformerEncoderLayer, PositionalEncoding):
        monkeypatch.delitem(registry._WRAPPERS, float_type)
    modules = tiny_modules()
    model = fq.prepare(Separator(modules), fq.QuantConfig.vanilla())
    report = fq.coverage_report(model, speech_like(batch=1, length=1600))
    assert not report.fully_quantized
    assert any(op.startswith("add in masknet.dual_mdl.0.intra_mdl.mdl.layers.0") for op in report.float_ops)
    assert any("decoder" in name for name in report.float_modules)       # Decoder: a ConvTranspose1d subclass


def test_wrappers_compute_the_float_function_at_16_bits():
    float_model = Separator(tiny_modules()).eval()
    modules = tiny_modules()
    quantize_inplace(modules, fq.QuantConfig.fqss(weight_bits=16, act_bits=16), keep_float_teacher=False)
    x = speech_like(batch=2, length=1600)
    model = calibrate(Separator(modules), x)
    with torch.no_grad():
        estimate, reference = model(x), float_model(x)
    assert float((estimate - reference).norm() / reference.norm()) < 2e-3


YAML = """
Encoder: !new:speechbrain.lobes.models.dual_path.Encoder
    kernel_size: 16
    out_channels: 16
block: !new:speechbrain.lobes.models.dual_path.SBTransformerBlock
    num_layers: 1
    d_model: 16
    nhead: 2
    d_ffn: 32
    dropout: 0
    use_positional_encoding: True
    norm_before: True
MaskNet: !new:speechbrain.lobes.models.dual_path.Dual_Path_Model
    in_channels: 16
    out_channels: 16
    intra_model: !ref <block>
    inter_model: !ref <block>
    num_layers: 1
    K: 20
    linear_layer_after_inter_intra: False
Decoder: !new:speechbrain.lobes.models.dual_path.Decoder
    in_channels: 16
    out_channels: 1
    kernel_size: 16
    stride: 8
    bias: False
modules:
    encoder: !ref <Encoder>
    masknet: !ref <MaskNet>
    decoder: !ref <Decoder>
checkpointer: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: CKPT_DIR
    recoverables:
        encoder: !ref <Encoder>
        masknet: !ref <MaskNet>
        decoder: !ref <Decoder>
fqss: !new:fqss_plugin.QuantConfig
    in_splits: 2
    out_splits: 2
    calib_steps: 3
float_teacher: !apply:fqss_plugin.speechbrain.quantize_inplace [!ref <modules>, !ref <fqss>]
"""


def test_quantize_inplace_in_hyperpyyaml_quantizes_every_alias(tmp_path):
    hparams = load_hyperpyyaml(io.StringIO(YAML.replace("CKPT_DIR", str(tmp_path))))
    assert isinstance(hparams["Encoder"], QSBEncoder) and isinstance(hparams["MaskNet"], QDual_Path_Model)
    assert isinstance(hparams["Decoder"], QSBDecoder)
    assert hparams["modules"]["masknet"] is hparams["MaskNet"]
    assert isinstance(hparams["checkpointer"], Checkpointer)
    assert hparams["checkpointer"].recoverables["decoder"] is hparams["Decoder"]
    assert hparams["MaskNet"].dual_mdl[0].intra_residual is not None
    teacher = hparams["float_teacher"]
    assert set(teacher) == {"encoder", "masknet", "decoder"}
    assert not any(is_quantized(m) for m in teacher.values())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher["masknet"] is not hparams["MaskNet"]
    # upstream parameter names: a float state_dict loads, only quantizer state is missing
    missing, unexpected = hparams["MaskNet"].load_state_dict(teacher["masknet"].state_dict(), strict=False)
    assert unexpected == [] and missing and all("quantizer" in k for k in missing)


def test_quantize_inplace_rejects_bad_arguments():
    with pytest.raises(TypeError, match="config must be a fqss_plugin.QuantConfig"):
        quantize_inplace(tiny_modules(), {"in_splits": 2})
    with pytest.raises(ValueError, match="encoder='encoder' is not a key of modules"):
        quantize_inplace({"masknet": tiny_modules()["masknet"], "decoder": tiny_modules()["decoder"]},
                         fq.QuantConfig.fqss())
    modules = tiny_modules()
    quantize_inplace(modules, fq.QuantConfig.fqss())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_inplace(modules, fq.QuantConfig.fqss())


def test_reset_layer_recursively_keeps_and_resets_the_quantizers():
    modules = tiny_modules()
    quantize_inplace(modules, fq.QuantConfig.fqss(calib_steps=1), keep_float_teacher=False)
    model = calibrate(Separator(modules), speech_like(batch=2, length=1600))
    quantizers = {n: type(m) for n, m in model.named_modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer))}
    assert not any(hasattr(t, "reset_parameters") for t in set(quantizers.values()))   # the stock recipe's test
    weight = model.masknet.conv1d.weight.detach().clone()
    for module in modules.values():
        FQSSBrainMixin.reset_layer_recursively(None, module)
    assert {n: type(m) for n, m in model.named_modules() if n in quantizers} == quantizers
    assert not torch.equal(weight, model.masknet.conv1d.weight)
    assert not any(bool(m.initialized) for m in model.modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer)))
    calibrate(model, speech_like(batch=2, length=1600))      # re-initialises from the new weights
    assert model.masknet.conv1d.weight_quantizer.initialized


def test_transfer_hook_loads_float_weights_and_names_a_bad_checkpoint(tmp_path):
    float_modules, other = tiny_modules(seed=1), tiny_modules(channels=8)
    torch.save(float_modules["masknet"].state_dict(), tmp_path / "masknet.ckpt")
    torch.save(other["masknet"].state_dict(), tmp_path / "small.ckpt")
    modules = tiny_modules()
    quantize_inplace(modules, fq.QuantConfig.fqss(), keep_float_teacher=False)
    calibrate(Separator(modules), speech_like(batch=1, length=1600))
    transfer_into_quantized(modules["masknet"], tmp_path / "masknet.ckpt")
    assert torch.equal(modules["masknet"].conv1d.weight, float_modules["masknet"].conv1d.weight)
    assert not modules["masknet"].conv1d.weight_quantizer.initialized       # re-initialises from these weights
    with pytest.raises(ValueError, match="small.ckpt: its weights do not fit"):
        transfer_into_quantized(modules["masknet"], tmp_path / "small.ckpt")


def test_quantized_package_reloads_through_from_hparams(tmp_path):
    modules = tiny_modules()
    config = fq.QuantConfig.fqss(calib_steps=1)
    quantize_inplace(modules, config, keep_float_teacher=False)
    mix = speech_like(batch=2, length=1600)
    model = calibrate(Separator(modules), mix)
    package = save_pretrained_separator(tmp_path / "pkg", modules, config, sample_rate=8000)
    separator = QuantizedSepformerSeparation.from_hparams(source=str(package), savedir=str(tmp_path / "saved"),
                                                          run_opts={"device": "cpu"})
    with torch.no_grad():
        expected = model(mix)
    estimate = separator.separate_batch(mix)
    assert estimate.shape == (2, 1600, 2)
    assert torch.allclose(estimate[:, :expected.shape[1]], expected, atol=1e-6)
    stock = SepformerSeparation.from_hparams(source=str(package), savedir=str(tmp_path / "stock"),
                                             run_opts={"device": "cpu"})
    assert torch.equal(stock.separate_batch(mix), estimate)
    sf.write(tmp_path / "mix.wav", mix[0].numpy(), 8000)
    assert separator.separate_file(str(tmp_path / "mix.wav")).shape == (1, 1600, 2)
    # float weights in a quantized package: refused, the quantizers would calibrate on the first input
    float_package = save_pretrained_separator(tmp_path / "float", tiny_modules(), None, sample_rate=8000)
    for name in ("encoder", "masknet", "decoder"):
        (package / f"{name}.ckpt").write_bytes((float_package / f"{name}.ckpt").read_bytes())
    with pytest.raises(ValueError, match="quantizers were not in the checkpoints"):
        QuantizedSepformerSeparation.from_hparams(source=str(package), savedir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="does not quantize the modules"):
        QuantizedSepformerSeparation.from_hparams(source=str(float_package), savedir=str(tmp_path / "bad2"))


def test_teacher_is_a_copy_taken_before_quantization():
    modules = tiny_modules()
    reference = copy.deepcopy(modules)
    teacher = quantize_inplace(modules, fq.QuantConfig.fqss())
    for key in reference:
        assert type(teacher[key]) is type(reference[key])
        for (name, a), (_, b) in zip(teacher[key].state_dict().items(), reference[key].state_dict().items()):
            assert torch.equal(a, b), name
