"""The toolkits' own recipes become FQSS QAT with the few lines the docs show (``docs/upstream/*.patch``).

The upstream recipes are kept unmodified, with their licences, under ``tests/upstream/``; each test applies
the documented patch to a copy, checks how many lines it changes, and trains a few steps on a tiny
embedded Libri2Mix, offline, loading the pretrained float model through the recipe's own hub code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fqss_plugin.data.speech import SpeechConfig, generate_speech

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = REPO / "tests" / "upstream"
PATCHES = REPO / "docs" / "upstream"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def changed_lines(patch: Path) -> int:
    return sum(1 for line in patch.read_text().splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---")))


def apply_patch(fixture: Path, patch: Path, work: Path) -> Path:
    recipe = work / fixture.name
    shutil.copytree(fixture, recipe)
    subprocess.run(["patch", "-p1", "--quiet", "-i", str(patch)], cwd=recipe, check=True)
    return recipe


def seed_hf_cache(home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """A Hugging Face hub cache holding ``files`` for ``repo_id`` (read with ``HF_HUB_OFFLINE=1``)."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)


@pytest.fixture(scope="module")
def libri2mix(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upstream_data")
    generate_speech(SpeechConfig(out=root, hours=0.004, train_speakers=4, eval_speakers=3, eval_mixtures=2, jobs=1,
                                 progress=False, cross_engine=False, mix_types=("mix_clean",)))
    return root / "Libri2Mix"


SB_TINY = {"N_encoder_out": 16, "out_channels": 16, "d_ffn": 32}
"""Command-line sizes for SpeechBrain's SepFormer yaml (its 8 layers and 8 heads stay as they are)."""


def sb_float_checkpoints(hparams_file: Path, tmp: Path) -> dict[str, bytes]:
    """Float encoder/masknet/decoder checkpoints of the yaml's SepFormer at the tiny sizes (the pretrained model)."""
    from hyperpyyaml import load_hyperpyyaml
    text = hparams_file.read_text()
    text = text[:text.index("float_teacher:")] if "float_teacher:" in text else text
    torch.manual_seed(0)
    hparams = load_hyperpyyaml(text, {"data_folder": str(tmp), "output_folder": str(tmp / "unused"), **SB_TINY})
    out = {}
    for key in ("encoder", "masknet", "decoder"):
        path = tmp / f"{key}.ckpt"
        torch.save(hparams["modules"][key].state_dict(), path)
        out[f"{key}.ckpt"] = path.read_bytes()
    return out


def test_speechbrain_librimix_separation_recipe_trains_fqss_with_three_added_lines(libri2mix, tmp_path):
    patch = PATCHES / "speechbrain-librimix-separation.patch"
    assert changed_lines(patch) <= 4
    recipe = apply_patch(UPSTREAM / "speechbrain_librimix_separation", patch, tmp_path)
    hparams_file = recipe / "hparams" / "sepformer-libri2mix.yaml"
    seed_hf_cache(tmp_path / "hf", "speechbrain/sepformer-wsj02mix", sb_float_checkpoints(hparams_file, tmp_path))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    flags = [f"--{key}={value}" for key, value in SB_TINY.items()]
    run = subprocess.run([sys.executable, "train.py", str(hparams_file), "--data_folder", str(libri2mix),
                          "--output_folder", str(out), "--device", "cpu", "--precision", "fp32", "--N_epochs", "1",
                          "--noprogressbar", *flags], cwd=recipe, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loaded float weights into quantized" in (out / "log.txt").read_text()
    assert "train fqss-loss:" in (out / "train_log.txt").read_text()
    assert (out / "test_results.csv").read_text().splitlines()[-1].startswith("avg,")
    checkpoint = sorted((out / "save").glob("CKPT+*"))[-1]
    state = torch.load(checkpoint / "masknet.ckpt", weights_only=True)
    steps = {int(v) for k, v in state.items() if k.endswith("steps_observed")}
    assert steps == {5}                  # 5 training mixtures, batch size 1: one calibration step each


def test_speechbrain_recipe_refuses_mixed_precision_for_qat(libri2mix, tmp_path):
    """The upstream yaml asks for fp16 (bf16 on CPU): a quantized run stops with one clear message."""
    recipe = apply_patch(UPSTREAM / "speechbrain_librimix_separation", PATCHES / "speechbrain-librimix-separation.patch",
                         tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    flags = [f"--{key}={value}" for key, value in SB_TINY.items()]
    text = (recipe / "hparams" / "sepformer-libri2mix.yaml").read_text()
    (recipe / "hparams" / "local.yaml").write_text(text[:text.index("pretrained_separator:")])   # no hub download
    run = subprocess.run([sys.executable, "train.py", "hparams/local.yaml", "--data_folder", str(libri2mix),
                          "--output_folder", str(tmp_path / "run"), "--device", "cpu", "--debug", *flags],
                         cwd=recipe, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "fqss QAT runs in fp32 only" in run.stdout + run.stderr
