"""``fqss analyze``: the b-bit SDR bound, the measured curve, the per-mixture and per-group figures, real PNGs."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from asteroid.models import ConvTasNet

import fqss_plugin as fq
from fqss_plugin.analysis import crest_factor_db, quantize_signal, signal_bound_db
from fqss_plugin.asteroid import prepare_model, save_quantized_model
from fqss_plugin.asteroid.package import with_plain_versions
from fqss_plugin.cli import main as cli_main
from fqss_plugin.data.speech import SpeechConfig, generate_speech


def test_bound_is_6_02_b_plus_1_76_for_a_full_scale_sine_and_quantization_meets_it():
    t = np.arange(80000) / 8000
    sine = 0.7 * np.sin(2 * np.pi * 441.3 * t)
    assert crest_factor_db(sine) == pytest.approx(3.01, abs=0.01)
    assert signal_bound_db(sine, 8) == pytest.approx(6.02 * 8 + 1.76, abs=0.05)
    assert signal_bound_db(sine, 12) - signal_bound_db(sine, 11) == pytest.approx(6.02, abs=0.01)
    x = torch.from_numpy(sine)[None]
    noise = quantize_signal(x, 10) - x
    measured = 10 * np.log10(float(x.pow(2).mean() / noise.pow(2).mean()))
    assert measured == pytest.approx(signal_bound_db(sine, 10), abs=0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    generate_speech(SpeechConfig(out=root / "data", hours=0.003, train_speakers=4, eval_speakers=3, eval_mixtures=3,
                                 jobs=1, progress=False, cross_engine=False, mix_types=("mix_clean",)))
    torch.manual_seed(0)
    float_model = ConvTasNet(n_src=2, n_filters=16, kernel_size=16, stride=8, n_blocks=2, n_repeats=1, bn_chan=16,
                             hid_chan=16, skip_chan=16, sample_rate=8000).eval()
    torch.save(with_plain_versions(float_model.serialize()), root / "float.pth")
    model = prepare_model(copy.deepcopy(float_model), fq.QuantConfig.fqss(calib_steps=1))
    with torch.no_grad():
        model.train()(torch.randn(2, 8000) * 0.1)
    fq.calibration_step(model)
    save_quantized_model(model, root / "best_model.pth")
    return root


def test_cli_writes_the_json_and_three_readable_plots(setup, tmp_path):
    import matplotlib.image

    mixtures = setup / "data" / "data" / "wav8k" / "min" / "test" / "mixture_test_mix_clean.csv"
    out = tmp_path / "analysis"
    assert cli_main(["analyze", "--checkpoint", str(setup / "best_model.pth"), "--float", str(setup / "float.pth"),
                     "--mixtures", str(mixtures), "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["mixtures"] == 3 and len(result["si_sdri"]["float"]) == len(result["si_sdri"]["quantized"]) == 3
    bound = result["bound_db"]["input"]
    assert bound["12"] - bound["8"] == pytest.approx(4 * 6.02, abs=0.05)
    assert result["measured_db"]["16"] > result["measured_db"]["4"]
    assert any("QFilterbankDecoder inputs" in group for group in result["sensitivity_db"])
    for name in ("sdr_vs_bits.png", "float_vs_quantized.png", "sensitivity.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 300
        dark = (image[..., :3].mean(axis=2) < 0.3).mean()     # axes, ticks, labels and data drawn in dark ink
        assert 0.005 < dark < 0.5, name
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20, name


def test_bad_arguments_are_one_clear_error(setup, tmp_path, capsys):
    assert cli_main(["analyze", "--checkpoint", str(setup / "best_model.pth"), "--mixtures",
                     str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err


def test_weight_budget_writes_a_map_that_the_recipe_conf_reads(setup, tmp_path):
    from fqss_plugin.asteroid.recipe import RecipeError, quant_config

    mixtures = setup / "data" / "data" / "wav8k" / "min" / "test" / "mixture_test_mix_clean.csv"
    out = tmp_path / "analysis"
    assert cli_main(["analyze", "--checkpoint", str(setup / "best_model.pth"), "--mixtures", str(mixtures),
                     "--out", str(out), "--no-sensitivity", "--weight-budget", "6"]) == 0
    bits = json.loads((out / "weight_bits.json").read_text())
    report = json.loads((out / "analysis.json").read_text())["weight_bits"]
    assert report["average_bits"] <= 6 and set(bits.values()) <= {4, 6, 8} and min(bits.values()) < 8
    quant = {"mode": "fqss", "weight_bits": 7, "act_bits": 8, "calib_steps": 1, "layer_weight_bits": str(out / "weight_bits.json")}
    config = quant_config({"quant": quant})
    assert config.layer_weight_bits == bits
    prepare_model(ConvTasNet(n_src=2, n_filters=16, kernel_size=16, stride=8, n_blocks=2, n_repeats=1, bn_chan=16,
                             hid_chan=16, skip_chan=16, sample_rate=8000), config)      # every name is a layer
    (tmp_path / "bad.yaml").write_text("- 4\n- 6\n")
    with pytest.raises(RecipeError, match="layer_weight_bits.*mapping"):
        quant_config({"quant": {**quant, "layer_weight_bits": str(tmp_path / "bad.yaml")}})


def test_reading_says_which_of_the_signal_path_and_the_network_limits():
    from fqss_plugin.analysis import reading

    def result(measured):
        bits = range(4, 17)
        return {"crest_factor_db": {"input_median": 12.0, "sources_median": 14.0}, "metric": "SI-SDR",
                "bound_db": {"input": {str(b): 6.02 * b - 7.2 for b in bits},
                             "output": {str(b): 6.02 * b - 9.2 for b in bits}},
                "measured_db": {str(b): measured(b) for b in bits}}
    network = reading(result(lambda b: min(6.02 * b - 10, 12.0)))      # saturates at 12 dB from 4 bits on
    assert "from 4 bits on" in network and "the network, not the signal path" in network
    assert "41.0 dB" in network                                         # the 8-bit input bound, 6.02 * 8 - 7.2
    path = reading(result(lambda b: min(6.02 * b - 10, 60.0)))          # the bound limits it up to 12 bits
    assert "from 12 bits on" in path and "the signal path limits it" in path
