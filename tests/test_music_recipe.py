"""The HTDemucs recipe on the toy MUSDB18-HQ: float, then FQSS QAT from its package, resumed, scored by museval."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "MUSDB18" / "HTDemucs"
TINY = ["htdemucs.channels=4", "htdemucs.depth=2", "htdemucs.nfft=512", "htdemucs.t_layers=1", "htdemucs.t_heads=2",
        "htdemucs.dconv_comp=2", "optim.batch_size=2", "augment.remix.group_size=2", "test.shifts=0"]


def load_recipe():
    return load_script(RECIPE / "train.py", "htdemucs_recipe_train")


@pytest.fixture
def musdb_root(toy_musdb):
    return toy_musdb


def run(recipe, conf: str, root: Path, exp: Path, *extra: str):
    return recipe.main([str(RECIPE / "conf" / conf), f"dset.musdb={root}", f"dset.metadata={exp.parent / 'meta'}",
                        f"exp_dir={exp}", *TINY, *extra])


def test_float_then_fqss_then_resume(musdb_root, tmp_path, one_thread):
    from demucs.pretrained import get_model

    from fqss_plugin.demucs import FQSSHTDemucs

    recipe = load_recipe()
    float_package = run(recipe, "float.yaml", musdb_root, tmp_path / "float", "optim.epochs=1")
    results = json.loads((tmp_path / "float" / "test_results.json").read_text())
    assert set(results["sources"]) == {"drums", "bass", "other", "vocals"} and len(results["tracks"]) == 1

    exp = tmp_path / "fqss"
    run(recipe, "fqss.yaml", musdb_root, exp, f"pretrained={float_package}", "optim.epochs=1", "quant.calib_steps=2")
    assert len(json.loads((exp / "history.json").read_text())) == 1
    run(recipe, "fqss.yaml", musdb_root, exp, f"pretrained={float_package}", "optim.epochs=2", "quant.calib_steps=2")
    history = json.loads((exp / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]              # resumed: epoch 2 only
    model = get_model("best", repo=exp)                              # Demucs' own loader
    assert isinstance(model, FQSSHTDemucs)
    steps = {int(m.steps_observed) for m in model.modules() if type(m).__name__ == "ActivationQuantizer"}
    assert steps == {2}
    assert "sdr_median" in json.loads((exp / "test_results.json").read_text())


def test_bad_inputs_name_the_key_or_path(musdb_root, tmp_path):
    recipe = load_recipe()
    with pytest.raises(recipe.RecipeError, match="ephocs"):
        run(recipe, "float.yaml", musdb_root, tmp_path / "x", "optim.ephocs=3")
    with pytest.raises(recipe.RecipeError, match="pretrained"):
        run(recipe, "fqss.yaml", musdb_root, tmp_path / "y")
    with pytest.raises(recipe.RecipeError, match="dset.musdb"):
        run(recipe, "float.yaml", tmp_path / "nowhere", tmp_path / "z")
    with pytest.raises(recipe.RecipeError, match="dset.segment=-1"):
        run(recipe, "float.yaml", musdb_root, tmp_path / "s", "dset.segment=-1")
    with pytest.raises(recipe.RecipeError, match="group_size=2"):              # TINY groups the remix by 2
        run(recipe, "float.yaml", musdb_root, tmp_path / "b", "optim.batch_size=3")
    with pytest.raises(recipe.RecipeError, match="calib_method"):
        run(recipe, "fqss.yaml", musdb_root, tmp_path / "c", "quant.calib_method=minmax", "pretrained=/nowhere.th")
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(b"not a package")
    with pytest.raises(recipe.RecipeError, match="corrupt.th: not a readable model package"):
        run(recipe, "fqss.yaml", musdb_root, tmp_path / "p", f"pretrained={corrupt}")
    assert not (tmp_path / "p" / "checkpoint.th").exists()


def test_torchrun_two_processes_train_fqss(musdb_root, tmp_path):
    """DDP on CPUs (gloo): two ranks split each batch, calibrate in step, rank 0 writes."""
    import os
    import socket
    import subprocess
    import sys

    recipe = load_recipe()
    float_package = run(recipe, "float.yaml", musdb_root, tmp_path / "float", "optim.epochs=1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exp = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "train.py", "conf/fqss.yaml", f"dset.musdb={musdb_root}", f"dset.metadata={tmp_path / 'meta'}",
               f"exp_dir={exp}", f"pretrained={float_package}", "optim.epochs=1", "quant.calib_steps=1",
               *[t for t in TINY if not t.startswith("optim.batch_size")], "optim.batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=RECIPE, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    history = json.loads((exp / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    state = torch.load(exp / "checkpoint.th", weights_only=True)["model"]
    assert {int(v) for k, v in state.items() if k.endswith("steps_observed")} == {1}
