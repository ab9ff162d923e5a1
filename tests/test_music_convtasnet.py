"""The music ConvTasNet (stereo, four sources): the model, its quantization, and its MUSDB18-HQ recipe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "MUSDB18" / "ConvTasNet"
TINY = dict(n_filters=16, kernel_size=20, stride=10, bn_chan=8, hid_chan=16, n_blocks=2, n_repeats=1)
TINY_CONF = [f"convtasnet.{key}={value}" for key, value in TINY.items()] + \
    ["convtasnet.segment=1", "optim.batch_size=2", "test.shifts=0"]


def test_stereo_model_is_demucs_layout_and_asteroid_package(tmp_path):
    from demucs.apply import apply_model

    from fqss_plugin.asteroid import StereoConvTasNet
    from fqss_plugin.asteroid.package import with_plain_versions

    model = StereoConvTasNet(**TINY).eval()
    mix = torch.randn(1, 2, 22050)
    with torch.no_grad():
        out = model(mix)
        assert out.shape == (1, 4, 2, 22050)
        chunked = apply_model(model, mix, split=True, segment=0.25, overlap=0.25)
    assert chunked.shape == out.shape
    swapped = mix.flip(1)                       # the left and right outputs come from different filters
    with torch.no_grad():
        assert not torch.allclose(model(swapped).flip(2), out)
    torch.save(with_plain_versions(model.serialize()), tmp_path / "m.pth")
    again = StereoConvTasNet.from_pretrained(str(tmp_path / "m.pth")).eval()
    with torch.no_grad():
        assert torch.equal(again(mix), out)
    with pytest.raises(ValueError, match=r"\[batch, 2, time\]"):
        model(torch.randn(1, 22050))


def test_quantized_stereo_model_covers_every_op_and_reloads(tmp_path):
    from fqss_plugin import QuantConfig, coverage_report
    from fqss_plugin.asteroid import StereoConvTasNet, load_quantized_model, prepare_model, save_quantized_model

    model = prepare_model(StereoConvTasNet(**TINY), QuantConfig.fqss(normalize_input=False))
    mix = torch.randn(2, 2, 8000)
    report = coverage_report(model, mix)
    assert report.fully_quantized, report
    from fqss_plugin.quant import SplitActivationQuantizer
    assert model.encoder.input_splitter is None                      # music is not bounded by 1: a learned range
    assert isinstance(model.encoder.input_quantizer, SplitActivationQuantizer)
    assert model.decoder.input_quantizer is not None and model.decoder.output_combiner is not None
    model(mix)
    save_quantized_model(model, tmp_path / "q.pth")
    again = load_quantized_model(tmp_path / "q.pth")
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(again(mix), model(mix))


def test_recipe_float_then_vanilla_and_fqss(toy_musdb, tmp_path, one_thread):
    from fqss_plugin.asteroid import StereoConvTasNet
    from fqss_plugin.asteroid.package import quantized_class

    recipe = load_script(RECIPE / "train.py", "music_convtasnet_train")

    def run(conf: str, exp: Path, *extra: str) -> Path:
        return recipe.main([str(RECIPE / "conf" / conf), f"dset.musdb={toy_musdb}", f"dset.metadata={tmp_path / 'meta'}",
                            f"exp_dir={exp}", "optim.epochs=1", *TINY_CONF, *extra])

    teacher = run("float.yaml", tmp_path / "float")
    results = json.loads((tmp_path / "float" / "test_results.json").read_text())
    assert set(results["sources"]) == {"drums", "bass", "other", "vocals"} and len(results["tracks"]) == 1
    for mode in ("vanilla", "fqss"):
        exp = tmp_path / mode
        package = run(f"{mode}.yaml", exp, f"pretrained={teacher}", "quant.calib_steps=2")
        model = StereoConvTasNet.from_pretrained(str(package))          # Asteroid's own loader
        assert isinstance(model, quantized_class(StereoConvTasNet))
        assert model.fqss_config.in_splits == (2 if mode == "fqss" else 1)
        assert model.fqss_config.normalize_input is False
        steps = {int(m.steps_observed) for m in model.modules() if type(m).__name__ == "ActivationQuantizer"}
        assert steps == {2}
        assert "sdr_median" in json.loads((exp / "test_results.json").read_text())
    with pytest.raises(recipe.RecipeError, match="StereoConvTasNet|quantized"):
        run("fqss.yaml", tmp_path / "again", f"pretrained={tmp_path / 'fqss' / 'best_model.pth'}")


@pytest.fixture(scope="module")
def calibrated():
    """A tiny quantized StereoConvTasNet whose quantizers have calibrated on a few batches (no training)."""
    import fqss_plugin as fq
    from fqss_plugin.asteroid import StereoConvTasNet, prepare_model

    torch.manual_seed(0)
    model = prepare_model(StereoConvTasNet(**{**TINY, "n_filters": 32, "bn_chan": 16, "hid_chan": 32}),
                          fq.QuantConfig.fqss(normalize_input=False, calib_steps=3))
    model.train()
    for _ in range(4):
        model(torch.randn(2, 2, 8000))
        fq.calibration_step(model)
    return model.eval()


def test_int8_export_of_the_stereo_model(calibrated, tmp_path):
    from fqss_plugin.export import ort_op_report, parity_report, to_onnx

    result = to_onnx(calibrated, tmp_path / "music.onnx")
    assert result.n_src == 4 and result.sample_rate == 44100
    mix = 0.5 * torch.randn(1, 2, 22050, generator=torch.Generator().manual_seed(1))
    parity = parity_report(calibrated, result.path, mix)
    assert parity.worst_local_beyond_1lsb == 0, str(parity)     # every quantizer within 1 LSB on the same inputs
    assert parity.snr_db >= 30, str(parity)
    report = ort_op_report(result.path)
    assert report.integer["MatMulIntegerToFloat"] == 4           # the decoder: 2 channels x 2 parts of its input
    assert "ConvTranspose" not in report.float_compute


def test_cli_separates_a_stereo_song_into_named_stems(calibrated, tmp_path):
    import numpy as np
    import soundfile as sf

    from fqss_plugin.asteroid import save_quantized_model
    from fqss_plugin.cli import main as cli_main
    from fqss_plugin.demucs.recipe import separator

    package = save_quantized_model(calibrated, tmp_path / "exp" / "best_model.pth")
    model = tmp_path / "music.onnx"
    assert cli_main(["export", "--checkpoint", str(package), "--out", str(model)]) == 0
    song = (0.3 * np.random.default_rng(0).standard_normal((30000, 2)) + 0.05).astype(np.float32)
    sf.write(tmp_path / "song.wav", song, 44100, subtype="FLOAT")
    assert cli_main(["separate", "--model", str(model), str(tmp_path / "song.wav"), "--out-dir",
                     str(tmp_path / "stems")]) == 0
    reference = separator(calibrated, shifts=0)(song, 44100)       # the recipes' normalisation and chunking
    for source in ("drums", "bass", "other", "vocals"):
        stem, rate = sf.read(tmp_path / "stems" / f"song_{source}.wav", dtype="float32")
        assert rate == 44100 and stem.shape == (30000, 2)
        ref = reference[source]
        assert 10 * np.log10((ref ** 2).sum() / ((ref - stem) ** 2).sum()) > 25
    sf.write(tmp_path / "mono.wav", song[:, 0], 44100)
    assert cli_main(["separate", "--model", str(model), str(tmp_path / "mono.wav"), "--out-dir",
                     str(tmp_path / "x")]) == 2
