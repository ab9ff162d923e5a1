"""One FQSS preset: ``QuantConfig.fqss()/vanilla()`` and ``FQSSLoss.fqss()/vanilla()``; every recipe conf and
the SpeechBrain hparams include files say the same, and ``import fqss_plugin`` needs only torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hyperpyyaml import load_hyperpyyaml

from fqss_plugin import FQSSLoss, QuantConfig
from fqss_plugin.asteroid.recipe import quant_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"fqss": (QuantConfig.fqss, FQSSLoss.fqss), "vanilla": (QuantConfig.vanilla, FQSSLoss.vanilla)}


def loss_settings(loss: FQSSLoss) -> tuple:
    return loss.lambda_kd, loss.task, loss.average, tuple(loss.weight_range)


@pytest.mark.parametrize("conf", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("recipes/*/*/conf/*.yml")
                                        if p.stem in PRESETS))
def test_recipe_confs_quantize_as_the_preset(conf):
    parsed = yaml.safe_load((ROOT / conf).read_text())
    mode = parsed["quant"]["mode"]
    assert quant_config(parsed) == PRESETS[mode][0]()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_speechbrain_hparams_include_is_the_preset(name):
    with open(ROOT / "hparams" / f"{name}.yaml", encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle)
    config, loss = PRESETS[name]
    assert hparams["config"] == config()
    assert loss_settings(hparams["loss"]) == loss_settings(loss())


def test_convtasnet_fqss_conf_trains_with_the_preset_loss():
    quant = yaml.safe_load((ROOT / "recipes/LibriMix/ConvTasNet/conf/fqss.yml").read_text())["quant"]
    preset = FQSSLoss.fqss()
    assert (quant["lambda_kd"], quant["loss_average"]) == (preset.lambda_kd, preset.average)


def test_import_needs_only_torch():
    code = ("import sys, fqss_plugin, fqss_plugin.quant, fqss_plugin.loss; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'asteroid', 'speechbrain', 'torchmetrics', "
            "'onnx', 'onnxruntime', 'pytorch_lightning', 'hyperpyyaml', 'asteroid_filterbanks'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
