"""The Demucs adapter on a tiny HTDemucs: the wrappers compute the float function, every layer is
quantized, QAT steps run, and Demucs' own ``apply_model`` runs the quantized model."""
from __future__ import annotations

import copy

import pytest
import torch
from demucs.apply import apply_model
from demucs.htdemucs import HTDemucs

import fqss_plugin as fq
from fqss_plugin.demucs import prepare_model
from fqss_plugin.quant.signal_io import SplitActivationQuantizer
from tests.conftest import relative_error

SOURCES = ["drums", "bass", "other", "vocals"]
FREQUENCY_BRANCH = {"encoder": 2, "decoder": 2}         # the recipe's FQSS conf


def tiny_htdemucs(seed: int = 0, **overrides) -> HTDemucs:
    """Depth 2, 4 channels, one cross-transformer layer, norms from the first layer, 8 kHz (``overrides``:
    other HTDemucs arguments)."""
    torch.manual_seed(seed)
    return HTDemucs(**{"sources": SOURCES, "channels": 4, "depth": 2, "nfft": 256, "t_layers": 1, "t_heads": 2,
                       "segment": 1, "samplerate": 8000, "dconv_comp": 2, "norm_starts": 1, **overrides})


def music(batch: int = 1, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(8000 * seconds)) / 8000
    tones = torch.sin(2 * torch.pi * 220 * t) + 0.5 * torch.sin(2 * torch.pi * 330 * t)
    return 0.1 * (tones + 0.3 * torch.randn(batch, 2, t.numel(), generator=gen))


@pytest.fixture
def calibrated(one_thread):
    float_model = tiny_htdemucs().eval()
    model = prepare_model(copy.deepcopy(float_model), fq.QuantConfig.fqss(weight_bits=16, act_bits=16,
                                                                          layer_act_splits=FREQUENCY_BRANCH))
    model.train()(music())
    fq.calibration_step(model)
    return float_model, model.eval()


def test_at_16_bits_the_quantized_htdemucs_computes_the_float_function(calibrated):
    float_model, model = calibrated
    x = music()                                   # the calibration data: no value outside a range
    with torch.no_grad():
        assert relative_error(model(x), float_model(x)) < 1e-3


def test_every_layer_of_both_branches_and_the_transformer_is_quantized(calibrated):
    _, model = calibrated
    report = fq.coverage_report(model, music())
    assert report.float_modules == []
    points = set(report.points())
    for name in ("encoder.0.conv.input_quantizer", "tencoder.0.conv.input_quantizer",   # both branch inputs
                 "decoder.1.skip_add.output_quantizer", "tdecoder.0.skip_add.output_quantizer",
                 "encoder.0.dconv.residual_adds.0.output_quantizer", "encoder.0.dconv.layers.0.6.scale_quantizer",
                 "freq_emb_add.output_quantizer", "crosstransformer.position_quantizer",
                 "crosstransformer.layers.0.attention_add.output_quantizer",
                 "crosstransformer.layers.0.activation.output_quantizer"):
        assert name in points, name
    float_ops = {op.split(" in ")[0] for op in report.float_ops}
    assert {"conv1d", "conv2d", "linear", "gelu", "glu", "layer_norm", "group_norm"}.isdisjoint(float_ops)


def test_float_demucs_weights_load_with_upstream_names():
    float_model = tiny_htdemucs(seed=3)
    model = prepare_model(tiny_htdemucs(seed=4))
    missing, unexpected = model.load_state_dict(float_model.state_dict(), strict=False)
    assert unexpected == [] and missing and all("quantizer" in k for k in missing)


def test_qat_steps_with_the_music_loss_then_demucs_apply_model(one_thread):
    teacher = tiny_htdemucs().eval()
    model = prepare_model(copy.deepcopy(teacher), fq.QuantConfig.fqss(calib_steps=2))
    loss_fn = fq.FQSSLoss(lambda_kd=0.1, task="l1")
    optimizer = torch.optim.Adam(fq.parameter_groups(model, 1e-2), lr=1e-3)
    fq.attach_calibration(optimizer, model)
    mix = music(batch=2, seed=2)
    target = torch.stack([mix * w for w in (0.4, 0.3, 0.2, 0.1)], dim=1)     # [B, 4 sources, 2, T]
    losses = []
    for _ in range(4):
        with torch.no_grad():
            teacher_estimate = teacher(mix)
        loss = loss_fn(model.train()(mix), target, teacher_estimate)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    steps = {int(q.steps_observed) for q in model.modules() if isinstance(q, fq.quant.ActivationQuantizer)}
    assert steps == {2}                          # calibrated for 2 steps, then learned
    estimates = apply_model(model.eval(), music(seconds=2.5, seed=5), shifts=1, split=True, overlap=0.25,
                            progress=False, device="cpu")
    assert estimates.shape == (1, 4, 2, 20000) and torch.isfinite(estimates).all()


def test_fqss_carries_both_inputs_and_outputs_on_two_8_bit_tensors(one_thread):
    """FQSS: both branch inputs split, both branch outputs combined (exact at 16 bits: the other tests);
    vanilla: one learned 8-bit quantizer per branch input, no combiner."""
    fqss = prepare_model(tiny_htdemucs())
    vanilla = prepare_model(tiny_htdemucs(), fq.QuantConfig.vanilla())
    for first in ("encoder.0.conv", "tencoder.0.conv"):
        assert isinstance(fqss.get_submodule(first).input_quantizer, SplitActivationQuantizer)
        assert isinstance(vanilla.get_submodule(first).input_quantizer, fq.quant.ActivationQuantizer)
    for last in ("decoder.1.conv_tr", "tdecoder.1.conv_tr"):
        assert fqss.get_submodule(last).output_combiner.splits == 2
        assert vanilla.get_submodule(last).output_combiner is None


def test_quantized_package_reloads_through_demucs_own_get_model(calibrated, tmp_path):
    from demucs.pretrained import get_model

    from fqss_plugin.demucs import FQSSHTDemucs, save_quantized_model

    _, model = calibrated
    save_quantized_model(model, tmp_path / "tinyq.th")
    reloaded = get_model("tinyq", repo=tmp_path)          # Demucs' local repository route, unchanged
    assert isinstance(reloaded, FQSSHTDemucs) and reloaded.fqss_config == model.fqss_config
    x = music(seed=7)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_frequency_branch_activations_on_two_8_bit_tensors_are_closer_to_float(one_thread):
    """``layer_act_splits``: every output quantizer inside the frequency branch's encoders and decoders carries
    its activation by 2 x 8-bit tensors (the last decoder keeps its output combiner); the time branch and the
    transformer keep one. Calibrated alike, the split model is closer to the float one."""
    float_model = tiny_htdemucs(seed=1)
    models = {}
    for key, config in [(False, fq.QuantConfig.fqss(calib_steps=3)),
                        (True, fq.QuantConfig.fqss(layer_act_splits=FREQUENCY_BRANCH, calib_steps=3)),
                        ("float", fq.QuantConfig.fqss(weight_bits=16, act_bits=16, calib_steps=3))]:
        model = prepare_model(copy.deepcopy(float_model), config)
        model.train()
        for seed in range(3):
            model(music(seed=seed))
            fq.calibration_step(model)
        models[key] = model.eval()
    split = models[True]
    owners = {name.rsplit(".", 1)[0] for name, m in split.named_modules() if isinstance(m, SplitActivationQuantizer)
              and name.endswith("output_quantizer")}
    assert "encoder.0.dconv.residual_adds.0" in owners and "decoder.0.glu" in owners and "encoder.1.conv" in owners
    assert not any(name.startswith(("tencoder", "tdecoder", "crosstransformer")) for name in owners)
    assert "decoder.1.conv_tr" not in owners and split.get_submodule("decoder.1.conv_tr").output_combiner.splits == 2
    assert all(type(m.output_quantizer) is fq.quant.ActivationQuantizer
               for name, m in models[False].named_modules() if name.startswith("encoder.") and
               isinstance(getattr(m, "output_quantizer", None), torch.nn.Module))
    x = music(seed=11)
    with torch.no_grad():                              # the frequency branch's output, before the mask
        _, _, spec, wave, _, _ = models[True].analyse(x)
        reference = models.pop("float").network(spec, wave)[0]      # 16 bits: the float function
        errors = {key: relative_error(model.network(spec, wave)[0], reference) for key, model in models.items()}
    assert errors[True] < 0.7 * errors[False], errors
    with pytest.raises(ValueError, match="layer_act_splits names 'encoders'"):
        prepare_model(tiny_htdemucs(), fq.QuantConfig.fqss(layer_act_splits={"encoders": 2}))
    with pytest.raises(ValueError, match="splits must be integers in 1..4"):
        fq.QuantConfig.fqss(layer_act_splits={"encoder": 8})


HUB_LOAD = """
import sys, torch
from demucs.pretrained import get_model
from fqss_plugin.demucs import load_pretrained_htdemucs
x = torch.load(sys.argv[1])
bag = get_model("hf://fqss/htdemucs_tinyq")                 # Demucs' own hub route: a bag of one model
quantized, teacher = bag.models[0].eval(), load_pretrained_htdemucs("htdemucs").eval()   # recipes' pretrained=
with torch.no_grad():
    out = {"quantized": quantized(x), "float": teacher(x), "classes": [type(quantized).__name__, type(teacher).__name__]}
torch.save(out, sys.argv[2])
"""


def test_hub_folders_load_through_demucs_get_model_from_an_offline_cache(calibrated, tmp_path):
    """``save_hub_folder`` writes Demucs' Hugging Face layout; with it in a hub cache and ``HF_HUB_OFFLINE=1``,
    ``get_model("hf://...")`` rebuilds the quantized model, and the plain name ``htdemucs`` (Demucs' default
    hub repository) the float one that ``pretrained=htdemucs`` of the recipe loads."""
    import os
    import subprocess
    import sys

    from demucs.hf import hf_repo_name

    from fqss_plugin.demucs import save_hub_folder
    from tests.conftest import seed_hf_cache

    float_model, model = calibrated
    for namespace, name, which in (("fqss", "htdemucs_tinyq", model), ("adefossez", "htdemucs", float_model)):
        folder = tmp_path / name
        save_hub_folder(which, folder, name, signature=f"{name}_sig")
        seed_hf_cache(tmp_path / "hf", f"{namespace}/{hf_repo_name(name)}",
                      {p.name: p.read_bytes() for p in folder.iterdir()})
    x = music(seed=9)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", HUB_LOAD, str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["classes"] == ["FQSSHTDemucs", "HTDemucs"]
    with torch.no_grad():
        assert torch.equal(out["quantized"], model(x)) and torch.equal(out["float"], float_model(x))
