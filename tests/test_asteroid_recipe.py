"""The Asteroid LibriMix ConvTasNet recipe end to end on tiny generated data (debug-sized)."""
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytorch_lightning
import pytest
import torch
import yaml

from fqss_plugin.asteroid import load_float_model, resolve_package
from fqss_plugin.quant import ActivationQuantizer
from fqss_plugin.asteroid.recipe import (RecipeError, evaluate, load_model, make_dataset, make_loaders, parse_conf,
                                         top_k_scores)
from fqss_plugin.data.speech import SpeechConfig, generate_speech
from tests.conftest import load_script

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "LibriMix"
RECIPE = RECIPES / "ConvTasNet"
TINY_MODEL = ["--n_filters", "16", "--kernel_size", "16", "--stride", "8", "--bn_chan", "8", "--hid_chan", "16",
              "--skip_chan", "8", "--n_blocks", "2", "--n_repeats", "1"]
TINY_DPTNET = ["--n_filters", "16", "--kernel_size", "16", "--stride", "8", "--in_chan", "16",
               "--n_heads", "2", "--ff_hid", "8", "--chunk_size", "20", "--hop_size", "10", "--n_repeats", "1"]


def recipe_train_module(name: str):
    """The recipe's own ``train.py`` (its ``main`` and ``build_float_model``)."""
    return load_script(RECIPES / name / "train.py", f"recipe_{name}_train")


train = recipe_train_module("ConvTasNet").main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("librimix")
    generate_speech(SpeechConfig(out=root, hours=0.006, train_speakers=4, eval_speakers=3, eval_mixtures=2, jobs=1,
                                 progress=False))
    return root / "data"


def conf_for(mode: str, data_dir: Path, exp_dir: Path, *extra: str, recipe: str = "ConvTasNet") -> dict:
    model = TINY_MODEL if recipe == "ConvTasNet" else TINY_DPTNET
    argv = ["--exp_dir", str(exp_dir), "--data_dir", str(data_dir), "--epochs", "1", "--segment", "1.0",
            "--batch_size", "2", "--progress_bar", "false", "--calib_steps", "1", *model, *extra]
    return parse_conf(RECIPES / recipe / "conf" / f"{mode}.yml", argv)


@pytest.fixture(scope="module")
def float_exp(data_dir, tmp_path_factory) -> Path:
    exp = tmp_path_factory.mktemp("exp") / "float"
    train(conf_for("float", data_dir, exp))
    return exp


@pytest.mark.parametrize("mode", ["vanilla", "fqss"])
def test_qat_runs_from_a_local_teacher_and_writes_asteroid_outputs(mode, data_dir, float_exp, tmp_path):
    exp = tmp_path / mode
    conf = conf_for(mode, data_dir, exp, "--pretrained", str(float_exp))
    best = train(conf)
    assert best == exp / "best_model.pth"
    for name in ("conf.yml", "best_k_models.json", "checkpoints/last.ckpt"):
        assert (exp / name).is_file(), name
    groups = torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [conf["optim"]["lr"], conf["quant"]["quantizer_lr"]]   # ranges at their own lr
    logged = (exp / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "kd_share" in logged                     # the distillation term's share of the objective (0 for vanilla)
    model = load_model(best)                         # the one documented reload call
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    assert quantizers and all(bool(q.initialized) for q in quantizers)
    assert (model.encoder.input_splitter is not None) == (mode == "fqss")
    metrics = evaluate(conf)
    assert set(metrics) >= {"si_sdr", "si_sdr_imp", "sdr", "sdr_imp", "stoi"}
    assert json.loads((exp / "eval" / "final_metrics.json").read_text()) == metrics
    assert all(v == v for v in metrics.values())     # no NaN


def test_dptnet_recipe_trains_a_teacher_then_fqss(data_dir, tmp_path):
    train_dptnet = recipe_train_module("DPTNet").main
    teacher = train_dptnet(conf_for("float", data_dir, tmp_path / "float", recipe="DPTNet"))
    conf = conf_for("fqss", data_dir, tmp_path / "fqss", "--pretrained", str(teacher.parent), recipe="DPTNet")
    model = load_model(train_dptnet(conf))
    assert type(model.masker.layers[0][0].recurrent).__name__ == "QLSTM"
    assert type(model.masker.layers[0][0].mha).__name__ == "QMultiheadAttention"
    assert set(evaluate(conf, metrics=["si_sdr"])) == {"si_sdr", "si_sdr_imp"}


def test_validation_sees_the_same_whole_mixtures_every_epoch(data_dir, tmp_path):
    train_loader, val_loader = make_loaders(conf_for("float", data_dir, tmp_path))
    first, second = list(val_loader), list(val_loader)
    assert len(first) == len(val_loader.dataset) and val_loader.batch_size == 1
    for (mix_a, sources_a, id_a), (mix_b, sources_b, id_b) in zip(first, second):
        assert id_a == id_b and torch.equal(mix_a, mix_b) and torch.equal(sources_a, sources_b)
    assert [mix.shape[-1] for mix, _, _ in first] == list(val_loader.dataset.df["length"])   # whole mixtures
    crops = [mix.shape[-1] for mix, _ in train_loader]
    assert set(crops) == {8000}                                                              # 1 s training crops


def test_teacher_loads_from_a_preseeded_hub_cache_offline(float_exp, tmp_path, monkeypatch):
    snapshot = tmp_path / "models--fqss--tiny-convtasnet" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(float_exp / "best_model.pth", snapshot / "pytorch_model.bin")
    (tmp_path / "models--fqss--tiny-convtasnet" / "refs").mkdir()
    (tmp_path / "models--fqss--tiny-convtasnet" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("asteroid.utils.hub_utils.CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = load_float_model("fqss/tiny-convtasnet")
    reference = load_float_model(float_exp / "best_model.pth")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="not available from the Hugging Face hub"):
        load_float_model("fqss/not-cached")


def test_interrupted_run_resumes_with_quantizer_state(data_dir, float_exp, tmp_path):
    exp = tmp_path / "fqss"
    calibrate = ("--pretrained", str(float_exp), "--calib_steps", "100")
    train(conf_for("fqss", data_dir, exp, *calibrate))      # "interrupted" after epoch 1
    first = torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)
    key = "model.masker.bottleneck.1.output_quantizer"
    steps = first["global_step"]
    assert steps > 0 and int(first["state_dict"][f"{key}.steps_observed"]) == steps
    train(conf_for("fqss", data_dir, exp, *calibrate, "--epochs", "2"))   # resumes: epoch 2 only
    resumed = torch.load(exp / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == first["epoch"] + 1 and resumed["global_step"] == 2 * steps
    # the calibration counter went on from where it stopped (a fresh start would read `steps`)
    assert int(resumed["state_dict"][f"{key}.steps_observed"]) == 2 * steps
    # rerunning the finished run trains nothing and keeps the best checkpoint and its record
    record = json.loads((exp / "best_k_models.json").read_text())
    best = torch.load(exp / "best_model.pth", weights_only=False)["state_dict"]
    train(conf_for("fqss", data_dir, exp, *calibrate, "--epochs", "2"))
    assert record and json.loads((exp / "best_k_models.json").read_text()) == record
    again = torch.load(exp / "best_model.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(best[k], again[k]) for k in best)


def test_resume_refuses_a_checkpoint_this_run_cannot_continue(data_dir, float_exp, tmp_path):
    """Another mode's last.ckpt in the exp_dir, or a QAT one from before the quantizer-range
    parameter group, fails with one message naming the file (not torch's state-dict error)."""
    exp = tmp_path / "reused"
    shutil.copytree(float_exp / "checkpoints", exp / "checkpoints")       # a float run's last.ckpt
    with pytest.raises(RecipeError, match=r"last.ckpt: does not match this model \(\d+ missing, \d+ unexpected"):
        train(conf_for("fqss", data_dir, exp, "--pretrained", str(float_exp)))
    qat = tmp_path / "qat"
    train(conf_for("vanilla", data_dir, qat, "--pretrained", str(float_exp)))
    last = qat / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    groups = state["optimizer_states"][0]["param_groups"]
    groups[0]["params"] += groups.pop(1)["params"]                          # the one-group layout of older runs
    torch.save(state, last)
    with pytest.raises(RecipeError, match="last.ckpt: its optimizer has 1 parameter group"):
        train(conf_for("vanilla", data_dir, qat, "--pretrained", str(float_exp), "--epochs", "2"))
    last.write_bytes(b"truncated")
    with pytest.raises(RecipeError, match="last.ckpt: not a readable Lightning checkpoint"):
        train(conf_for("vanilla", data_dir, qat, "--pretrained", str(float_exp), "--epochs", "2"))


def test_bad_inputs_fail_with_one_clear_message(data_dir, float_exp, tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="no LibriMix metadata"):
        make_dataset(conf_for("float", tmp_path / "missing", tmp_path / "exp"), "dev", 1.0)
    with pytest.raises(RecipeError, match="--conf .*no such file"):
        parse_conf(tmp_path / "nope.yml", [])
    wrong_rate = tmp_path / "wrong_rate"
    shutil.copytree(data_dir / "wav8k" / "min" / "dev", wrong_rate / "wav16k" / "min" / "dev")
    with pytest.raises(RecipeError, match="sample rate 8000 Hz, but data.sample_rate is 16000"):
        make_dataset(conf_for("float", wrong_rate, tmp_path / "exp", "--sample_rate", "16000"), "dev", None)
    corrupt = tmp_path / "corrupt"                    # a copy of the dataset with one broken wav
    shutil.copytree(data_dir.parent, corrupt)
    for csv_file in (corrupt / "data" / "wav8k" / "min" / "dev").glob("*.csv"):
        csv_file.write_text(csv_file.read_text().replace(str(data_dir.parent), str(corrupt)))
    first_row = (corrupt / "data" / "wav8k" / "min" / "dev" / "mixture_dev_mix_clean.csv").read_text().splitlines()[1]
    bad_wav = Path(first_row.split(",")[2])
    bad_wav.write_bytes(b"not a wav file")
    with pytest.raises(RecipeError, match=f"{bad_wav.name}: missing or unreadable audio"):
        make_dataset(conf_for("float", corrupt / "data", tmp_path / "exp"), "dev", None)
    # a large split is only sampled up front; a bad file outside the sample is named when it is read
    monkeypatch.setattr("fqss_plugin.asteroid.recipe.MAX_CHECKED_FILES", 1)   # sample: the first mixture only
    dataset = make_dataset(conf_for("float", corrupt / "data", tmp_path / "exp"), "dev", None)
    with pytest.raises(RecipeError, match=f"row 0: missing or unreadable audio .*{bad_wav.name}"):
        dataset[0]
    not_a_package = tmp_path / "state_dict.pth"
    torch.save({"weight": torch.zeros(3)}, not_a_package)
    with pytest.raises(ValueError, match="not an Asteroid model package"):
        resolve_package(not_a_package)
    with pytest.raises(ValueError, match="quantized fqss model; a float teacher is needed"):
        exp = tmp_path / "q"
        train(conf_for("vanilla", data_dir, exp, "--pretrained", str(float_exp)))
        load_float_model(exp / "best_model.pth")
    with pytest.raises(RecipeError, match="needs --pretrained"):
        train(conf_for("fqss", data_dir, tmp_path / "nopre"))
    a_file = tmp_path / "a_file"
    a_file.write_text("an earlier result")
    for exp in (a_file, a_file / "exp"):                 # output locations are checked before any work
        with pytest.raises(RecipeError, match=r"--exp_dir .*a_file.*: not a directory this run can write to"):
            train(conf_for("float", data_dir, exp))
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "checkpoints").write_text("not a folder")
    with pytest.raises(RecipeError, match=r"--exp_dir .*blocked/checkpoints: not a directory"):
        train(conf_for("float", data_dir, tmp_path / "blocked"))
    assert a_file.read_text() == "an earlier result"


def test_conf_typos_and_corrupt_checkpoints_are_named(data_dir, float_exp, tmp_path):
    """A key the recipe would ignore, a model argument it does not take, a truncated top-k checkpoint: one
    RecipeError each, naming the file or key (never a silent default or a traceback without a name)."""
    conf = yaml.safe_load((RECIPES / "ConvTasNet" / "conf" / "float.yml").read_text())
    conf["training"]["ephocs"] = 1
    typo = tmp_path / "typo.yml"
    typo.write_text(yaml.safe_dump(conf))
    with pytest.raises(RecipeError, match=r"typo.yml: unknown key training.ephocs \(did you mean 'epochs'\?\)"):
        parse_conf(typo, [])
    del conf["training"]["ephocs"]
    conf["filterbank"]["n_filter"] = 64
    typo.write_text(yaml.safe_dump(conf))
    with pytest.raises(RecipeError, match="filterbank/masknet: .*n_filter"):
        train(parse_conf(typo, ["--exp_dir", str(tmp_path / "e"), "--data_dir", str(data_dir)]))
    checkpoint = next((float_exp / "checkpoints").glob("epoch=*.ckpt"))
    broken = tmp_path / "checkpoints" / checkpoint.name
    broken.parent.mkdir()
    broken.write_bytes(checkpoint.read_bytes()[:4096])
    with pytest.raises(RecipeError, match=f"{broken.name}: unreadable checkpoint"):
        top_k_scores(broken.parent)


class ConstantValidation(pytorch_lightning.LightningModule):
    """One weight, one step per epoch, a validation loss that never improves."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 1)))

    def val_dataloader(self):
        return self.train_dataloader()


def test_last_checkpoint_is_every_epoch_even_without_improvement(tmp_path):
    """Lightning's save_last only follows top-k saves: its last.ckpt would stay at epoch 0 here."""
    from fqss_plugin.asteroid.recipe import LastCheckpoint
    lightning_last = pytorch_lightning.callbacks.ModelCheckpoint(dirpath=tmp_path / "lightning", monitor="val_loss",
                                                                 save_top_k=1, save_last=True)
    trainer = pytorch_lightning.Trainer(max_epochs=3, logger=False, enable_progress_bar=False,
                                        enable_model_summary=False,
                                        callbacks=[lightning_last, LastCheckpoint(tmp_path / "last.ckpt")])
    trainer.fit(ConstantValidation())
    assert torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=True)["epoch"] == 0
    ours = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ours["epoch"] == 2 and ours["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "lightning"]     # no temporary file left


@pytest.mark.parametrize("recipe", ["ConvTasNet", "DPTNet"])
def test_the_shipped_embedded_teachers_load_through_asteroid_and_separate(recipe, data_dir):
    """``pretrained/embedded_float`` of each recipe is a float Asteroid package of the recipe's own
    ``conf/float.yml`` architecture (loaded by ``from_pretrained``) that separates the test mixtures."""
    from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr
    teacher = load_float_model(RECIPES / recipe / "pretrained" / "embedded_float").eval()
    expected = recipe_train_module(recipe).build_float_model(parse_conf(RECIPES / recipe / "conf" / "float.yml", []))
    assert type(teacher) is type(expected) and teacher.get_model_args() == expected.get_model_args()
    loss = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    conf = conf_for("float", data_dir, data_dir.parent / "unused", recipe=recipe)
    improvements = []
    for mix, sources, _ in make_dataset(conf, "test", None):
        with torch.no_grad():
            improvements.append(float(loss(mix[None, None].expand(1, 2, -1), sources[None])
                                      - loss(teacher(mix[None]), sources[None])))
    # mean SI-SDRi over the 2 tiny test mixtures (one is hard for both: about 1 dB); untrained models get about 0
    assert len(improvements) == 2 and sum(improvements) / 2 > 5.0, improvements


def test_last_checkpoint_holds_the_top_k_record_of_its_own_epoch(float_exp):
    """``last.ckpt`` is written after the top-k checkpoint of the same epoch, so a resumed or rerun run
    knows every top-k file; the best model is picked from the scores stored in the files themselves."""
    from fqss_plugin.asteroid.recipe import top_k_scores
    checkpoints = float_exp / "checkpoints"
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    (record,) = [v for k, v in state.items() if k.startswith("ModelCheckpoint")]
    files = sorted(checkpoints.glob("epoch=*.ckpt"))
    assert files and sorted(Path(p) for p in record["best_k_models"]) == files
    scores = top_k_scores(checkpoints)
    assert sorted(scores) == files and all(score == pytest.approx(float(record["best_k_models"][str(path)]))
                                           for path, score in scores.items())


def test_a_kill_during_any_lightning_checkpoint_write_leaves_the_earlier_file(tmp_path, monkeypatch):
    """Top-k checkpoints and last.ckpt go through AtomicCheckpointIO: a write that dies half-way (here: torch.save
    writes some bytes, then the process is 'killed') leaves the earlier checkpoint whole and loadable."""
    from fqss_plugin.asteroid.recipe import AtomicCheckpointIO

    path = tmp_path / "epoch=3-step=40.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 3, "state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 4, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [path.name]            # no temporary file left behind
