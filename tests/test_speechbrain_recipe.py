"""The SpeechBrain SepFormer recipe (recipes/LibriMix/SepFormer) on tiny generated Libri2Mix data:
float / vanilla / FQSS runs, pretrained weights from a local directory and from a pre-seeded Hugging
Face cache (offline), recovery of the quantizer state after an interruption, two-process DDP with
torchrun, and clear errors for bad inputs."""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fqss_plugin.data.speech import SpeechConfig, generate_speech
from fqss_plugin.quant.quantizers import ActivationQuantizer
from fqss_plugin.speechbrain import QuantizedSepformerSeparation, save_pretrained_separator
from tests.conftest import load_script, seed_hf_cache
from tests.test_speechbrain_adapter import TINY_OVERRIDES, tiny_modules

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "LibriMix" / "SepFormer"
HUB_ID = "fqss/tiny-sepformer"


def load_recipe():
    return load_script(RECIPE / "train.py", "sepformer_recipe_train")


@pytest.fixture(scope="module")
def recipe():
    torch.set_num_threads(1)
    return load_recipe()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny embedded Libri2Mix (5 train, 2 dev, 2 test mixtures) and a tiny float SepFormer package."""
    root = tmp_path_factory.mktemp("sb_data")
    generate_speech(SpeechConfig(out=root, hours=0.004, train_speakers=4, eval_speakers=3, eval_mixtures=2, jobs=1,
                                 progress=False, cross_engine=False, mix_types=("mix_clean",)))
    package = save_pretrained_separator(root / "float_package", tiny_modules(seed=3), None, sample_rate=8000)
    return {"libri2mix": root / "Libri2Mix", "float": package, "root": root}


def args(yaml: str, data: dict, out: Path, *extra: str) -> list[str]:
    return [str(RECIPE / "hparams" / yaml), "--data_folder", str(data["libri2mix"]), "--output_folder", str(out),
            "--device", "cpu", "--noprogressbar", *TINY_OVERRIDES, *extra]


def test_recipe_hparams_parse():
    from hyperpyyaml import load_hyperpyyaml
    for path in sorted((RECIPE / "hparams").glob("*.yaml")):
        with open(path) as handle:
            hparams = load_hyperpyyaml(handle, {"data_folder": "unused", "N_encoder_out": 8, "out_channels": 8,
                                                "d_ffn": 8, "num_transformer_layers": 1, "nhead": 2})
        quantized = "quant" in hparams
        assert quantized == ("fqss" in path.name or "vanilla" in path.name), path.name
        if quantized:
            assert type(hparams["MaskNet"]).__name__ == "QDual_Path_Model"
            assert (hparams["float_teacher"] is not None) == ("fqss" in path.name)
            assert hparams["precision"] == "fp32" and "pretrained_separator" in hparams
            assert hparams["fqss"].quantizer_lr == hparams["quantizer_lr"] == 0.01    # a top-level key: --quantizer_lr


def results(out: Path) -> list[dict]:
    with open(out / "test_results.csv") as handle:
        return list(csv.DictReader(handle))


def test_float_and_vanilla_debug_runs(recipe, data, tmp_path):
    out = tmp_path / "float"
    recipe.main(args("sepformer-embedded-float.yaml", data, out, "--debug"))
    rows = results(out)
    assert [r["snt_id"] for r in rows][-1] == "avg" and len(rows) == 3
    assert set(rows[0]) == {"snt_id", "sdr", "sdr_i", "si-snr", "si-snr_i"}
    log = (out / "train_log.txt").read_text().splitlines()
    assert log[0].startswith("epoch: 1, lr: ") and "train si-snr:" in log[0] and "valid si-snr:" in log[0]
    assert "Epoch loaded: 2 - test si-snr:" in log[-1]
    assert (out / "hyperparams.yaml").is_file() and (out / "save" / "libri2mix_test.csv").is_file()

    # vanilla QAT from the float run's own package (a local directory)
    out_q = tmp_path / "vanilla"
    separator = recipe.main(args("sepformer-embedded-vanilla.yaml", data, out_q, "--debug",
                                 "--pretrained_path", str(out / "pretrained")))
    assert separator.teacher is None and separator.quantized
    assert "train fqss-loss:" in (out_q / "train_log.txt").read_text()
    assert results(out_q)[-1]["snt_id"] == "avg"
    model = QuantizedSepformerSeparation.from_hparams(source=str(out_q / "pretrained"), savedir=str(tmp_path / "m"),
                                                      run_opts={"device": "cpu"})
    assert model.separate_batch(torch.randn(1, 4000) * 0.1).shape == (1, 4000, 2)


def test_fqss_run_with_pretrained_from_offline_hub_cache(data, tmp_path):
    """The real hub code path (Pretrainer -> fetch -> huggingface_hub) against a pre-seeded cache."""
    seed_hf_cache(tmp_path / "hf", HUB_ID, {f"{name}.ckpt": (data["float"] / f"{name}.ckpt").read_bytes()
                                            for name in ("encoder", "masknet", "decoder")})
    out = tmp_path / "fqss"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "train.py", *args("sepformer-embedded-fqss.yaml", data, out, "--debug",
                                                            "--pretrained_path", HUB_ID, "--calib_steps", "2")],
                         cwd=RECIPE, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "loaded float weights into quantized QDual_Path_Model" in log
    assert "train fqss-loss:" in (out / "train_log.txt").read_text()
    assert results(out)[-1]["snt_id"] == "avg"
    state = torch.load(out / "pretrained" / "masknet.ckpt", weights_only=True)
    steps = [int(v) for k, v in state.items() if k.endswith("steps_observed")]
    assert steps and all(s == 2 for s in steps)          # calibrated for 2 steps (4 were taken), then learned


class Interrupted(Exception):
    pass


def test_resume_after_interruption_restores_quantizer_state(recipe, data, tmp_path, monkeypatch):
    """Interrupt QAT after 3 of 5 steps (an intra-epoch checkpoint was saved after step 2), then resume:
    the quantizers continue from the checkpoint, they do not start calibrating again."""
    out = tmp_path / "resume"
    common = args("sepformer-embedded-fqss.yaml", data, out, "--pretrained_path", str(data["float"]),
                  "--N_epochs", "1", "--batch_size", "1", "--ckpt_interval_minutes", "0",
                  "--ckpt_interval_steps", "2")
    brain = recipe.Separation
    original_fit_batch, original_fit_start = brain.fit_batch, brain.on_fit_start
    calls = []

    def crashing_fit_batch(self, batch):
        if len(calls) == 3:
            raise Interrupted
        calls.append(1)
        return original_fit_batch(self, batch)

    monkeypatch.setattr(brain, "fit_batch", crashing_fit_batch)
    with pytest.raises(Interrupted):
        recipe.main(common)
    checkpoints = sorted((out / "save").glob("CKPT+*"))
    assert len(checkpoints) == 1
    saved = torch.load(checkpoints[0] / "masknet.ckpt", weights_only=True)
    assert {int(v) for k, v in saved.items() if k.endswith("steps_observed")} == {2}
    groups = torch.load(checkpoints[0] / "optimizer.ckpt", weights_only=True)["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == 0.01 and groups[1]["weight_decay"] == 0.0   # hparams/fqss.yaml

    recovered = {}

    def recording_fit_start(self):
        original_fit_start(self)
        recovered.update({k: v.clone() for k, v in self.hparams.MaskNet.state_dict().items() if "quantizer" in k})

    monkeypatch.setattr(brain, "fit_batch", original_fit_batch)
    monkeypatch.setattr(brain, "on_fit_start", recording_fit_start)
    separator = recipe.main(common)
    assert recovered.keys() == {k for k in saved if "quantizer" in k}
    assert all(torch.equal(recovered[k], saved[k]) for k in recovered)
    quantizers = [m for m in separator.hparams.MaskNet.modules() if isinstance(m, ActivationQuantizer)]
    assert {int(q.steps_observed) for q in quantizers} == {5}   # 2 before + 3 after the interruption
    assert [g["lr"] for g in separator.optimizer.param_groups][1] == 0.01
    assert len((out / "train_log.txt").read_text().splitlines()) == 2   # epoch 1, then the test line


LAUNCHER = """
import importlib.util, os, sys, torch
spec = importlib.util.spec_from_file_location("recipe_train", sys.argv[1])
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
evaluate = recipe.Separation.evaluate

def dump_then_evaluate(self, *args, **kwargs):   # the state each rank trained, before the best checkpoint reloads
    state = {f"{key}.{name}": t for key in ("encoder", "masknet", "decoder")
             for name, t in getattr(self.hparams, {"encoder": "Encoder", "masknet": "MaskNet", "decoder": "Decoder"}[key]
                                    ).state_dict().items()}
    torch.save(state, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    return evaluate(self, *args, **kwargs)

recipe.Separation.evaluate = dump_then_evaluate
recipe.main(sys.argv[3:])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_gloo_identical_quantizer_state(data, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    command = [str(torchrun), "--nproc_per_node=2", "--master_port", str(free_port()), str(launcher),
               str(RECIPE / "train.py"), str(tmp_path),
               *args("sepformer-embedded-fqss.yaml", data, out, "--debug", "--distributed_backend=gloo",
                     "--pretrained_path", str(data["float"]), "--calib_steps", "1")]
    run = subprocess.run(command, cwd=RECIPE, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    quantizer_keys = [k for k in ranks[0] if "quantizer" in k or "input_splitter" in k]
    assert len(quantizer_keys) > 100
    different = [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    assert different == []
    steps = {int(v) for k, v in ranks[0].items() if k.endswith("steps_observed")}
    assert steps == {1}                                   # calibrated on both ranks' data, then learned
    assert results(out)[-1]["snt_id"] == "avg"


def test_bad_inputs_name_the_file_or_parameter(recipe, data, tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_folder .*nowhere: no such directory"):
        recipe.main(args("sepformer-embedded-float.yaml", {"libri2mix": tmp_path / "nowhere"}, tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="--pretrained_path .*missing_model: no such directory"):
        recipe.main(args("sepformer-embedded-fqss.yaml", data, tmp_path / "b", "--pretrained_path",
                         str(tmp_path / "missing_model")))
    wrong = save_pretrained_separator(tmp_path / "wrong", tiny_modules(channels=8), None, sample_rate=8000)
    with pytest.raises(ValueError, match=r"(encoder|masknet|decoder)\.ckpt: its weights do not fit"):
        recipe.main(args("sepformer-embedded-fqss.yaml", data, tmp_path / "c", "--pretrained_path", str(wrong)))
    with pytest.raises(FileNotFoundError, match="nope.yaml: no such hparams file"):
        recipe.main([str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="precision: bf16: fqss QAT runs in fp32 only"):
        recipe.main(args("sepformer-embedded-fqss.yaml", data, tmp_path / "d", "--precision", "bf16"))
    finished = tmp_path / "finished"
    (finished / "pretrained").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--debug would overwrite the finished run in .*finished"):
        recipe.main(args("sepformer-embedded-float.yaml", data, finished, "--debug"))
    assert [p for p in finished.rglob("*") if p.is_file()] == []          # no file written (the yaml makes save/)


def test_the_shipped_embedded_teacher_loads_with_the_stock_inference_class_and_separates(data, tmp_path):
    """``pretrained/embedded_float`` (the embedded QAT recipes' default pretrained_path) is a stock
    SpeechBrain package of the embedded-size architecture, and it separates a two-speaker mixture."""
    from speechbrain.inference.separation import SepformerSeparation
    from speechbrain.nnet.losses import get_si_snr_with_pitwrapper
    shipped = RECIPE / "pretrained" / "embedded_float"
    model = SepformerSeparation.from_hparams(source=str(shipped), savedir=str(tmp_path / "teacher"),
                                             run_opts={"device": "cpu"})
    assert sum(p.numel() for p in model.mods.parameters()) == 161_921
    import soundfile
    test = data["libri2mix"] / "wav8k" / "min" / "test"
    improvements = []
    for mix_path in sorted((test / "mix_clean").glob("*.wav")):
        mixture = torch.from_numpy(soundfile.read(mix_path, dtype="float32")[0])
        sources = torch.stack([torch.from_numpy(soundfile.read(test / s / mix_path.name, dtype="float32")[0])
                               for s in ("s1", "s2")], dim=-1)[None]
        with torch.no_grad():
            estimates = model.separate_batch(mixture[None])
        si_snr = -get_si_snr_with_pitwrapper(estimates, sources).mean()
        improvements.append(si_snr + get_si_snr_with_pitwrapper(torch.stack([mixture[None]] * 2, -1), sources).mean())
    assert len(improvements) == 2 and min(improvements) > 2.0, improvements   # SI-SNRi (the test split: 6.5 dB)
