"""The building blocks of the Asteroid recipes (``recipes/LibriMix/*``), whose ``train.py`` composes them.

They follow Asteroid's ``egs/librimix`` recipes: a nested ``conf.yml`` whose leaves are command-line flags,
``asteroid.data.LibriMix`` datasets, ``PITLossWrapper``, a Lightning ``Trainer`` with top-k
checkpoints, ``best_model.pth`` and ``eval/final_metrics.json`` from ``asteroid.metrics.get_metrics``.

The ``quant.mode`` of the config picks the job:

* ``float``: train the float model (the teacher of the embedded benchmark);
* ``vanilla``: QAT from a pretrained float model, task loss only, one 8-bit input/output quantizer;
* ``fqss``: QAT with the input splitter, output combiner and distillation from the float model.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytorch_lightning as pl
import soundfile as sf
import torch
import yaml
from asteroid.data import LibriMix
from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr
from asteroid.metrics import get_metrics
from asteroid.utils import parse_args_as_dict, prepare_parser_from_dict
from pytorch_lightning.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..atomic import atomic_save
from ..loss import FQSSLoss
from ..quant import QuantConfig
from ..quant.config import read_layer_weight_bits
from ..recipe_errors import RecipeError, run_recipe
from .package import (load_float_model, load_quantized_model, prepare_model, save_quantized_model,
                      with_plain_versions)

MODES = ("float", "vanilla", "fqss")
METRICS = ["si_sdr", "sdr", "stoi"]
MAX_CHECKED_FILES = 4000
"""Audio files whose header :func:`check_audio_files` reads when a dataset is built (evenly spaced)."""
AUDIO_ERRORS = (RuntimeError, sf.LibsndfileError)
"""What soundfile raises on a missing or unreadable file."""


CONF_KEYS = {
    "data": {"data_dir", "task", "sample_rate", "librimix_mode", "test_split", "n_src", "segment"},
    "training": {"epochs", "batch_size", "num_workers", "half_lr", "early_stop", "gradient_clip",
                 "limit_train_batches", "limit_val_batches", "progress_bar", "seed"},
    "quant": {"mode", "lambda_kd", "weight_bits", "layer_weight_bits", "act_bits", "decoder_in_splits", "encoder_out_splits",
              "calib_steps", "calib_method", "quantizer_lr", "weight_init", "loss_average"},
    "optim": None, "filterbank": None, "masknet": None,     # passed on as keyword arguments (checked there)
}
"""The sections of a recipe conf and the keys the recipe reads (None: any key, passed on to a constructor)."""


def check_conf_keys(conf: dict, path: Path) -> None:
    """One :class:`RecipeError` naming the first section or key of ``conf`` that the recipe would ignore."""
    import difflib

    def unknown(name: str, known) -> RecipeError:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        return RecipeError(f"{path}: unknown key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; known: {', '.join(sorted(known))}")
    for section, values in conf.items():
        if section not in CONF_KEYS:
            raise unknown(section, CONF_KEYS)
        keys = CONF_KEYS[section]
        if keys is not None and isinstance(values, dict):
            for key in values:
                if key not in keys:
                    error = unknown(key, keys)
                    raise RecipeError(str(error).replace(f"key {key!r}", f"key {section}.{key}", 1)) from None


def parse_conf(conf_path: str | Path, argv: list[str] | None = None) -> dict:
    """Asteroid's recipe convention: every leaf of the yaml is also a ``--flag``."""
    conf_path = Path(conf_path)
    if not conf_path.is_file():
        raise RecipeError(f"--conf {conf_path}: no such file")
    with open(conf_path) as handle:
        defaults = yaml.safe_load(handle)
    check_conf_keys(defaults, conf_path)
    parser = argparse.ArgumentParser()
    parser.add_argument("--conf", default=str(conf_path))
    parser.add_argument("--exp_dir", default=None, help="experiment directory (default: exp/<tag>)")
    parser.add_argument("--pretrained", default=None, help="float teacher: hub id, directory or model file")
    prepare_parser_from_dict(defaults, parser=parser)
    conf = parse_args_as_dict(parser, args=argv)
    if conf["quant"]["mode"] not in MODES:
        raise RecipeError(f"quant.mode must be one of {MODES}, got {conf['quant']['mode']!r}")
    return conf


def split_dir(conf: dict, split: str) -> Path:
    """``<data_dir>/wav8k/min/<split>`` (the split's metadata directory)."""
    data = conf["data"]
    rate = f"wav{data['sample_rate'] // 1000}k"
    path = Path(data["data_dir"]) / rate / data["librimix_mode"] / split
    csvs = sorted(path.glob("mixture_*.csv")) if path.is_dir() else []
    if not csvs:
        raise RecipeError(f"{path}: no LibriMix metadata (mixture_{split}_*.csv) here. Generate the embedded data with "
                          f"`fqss make-data speech --out DIR` and pass --data_dir DIR/data, or point --data_dir at a "
                          f"directory holding Asteroid's local LibriMix metadata")
    return path


class CheckedLibriMix(LibriMix):
    """``asteroid.data.LibriMix`` whose reads fail with a :class:`RecipeError` naming the split and the error
    (soundfile's message names the file), instead of a traceback from inside a data loader."""

    def __getitem__(self, idx):
        try:
            return super().__getitem__(idx)
        except AUDIO_ERRORS as error:
            raise RecipeError(f"{self.csv_path}: row {idx}: missing or unreadable audio ({error})") from None


def make_dataset(conf: dict, split: str, segment: float | None) -> LibriMix:
    data = conf["data"]
    dataset = CheckedLibriMix(csv_dir=str(split_dir(conf, split)), task=data["task"], sample_rate=data["sample_rate"],
                              n_src=data["n_src"], segment=segment, return_id=segment is None)
    if not len(dataset):
        raise RecipeError(f"{split_dir(conf, split)}: no mixture is at least {segment} s long")
    check_audio_files(dataset, data["sample_rate"])
    return dataset


def check_audio_files(dataset: LibriMix, sample_rate: int) -> None:
    """Fail early, naming the file, on a missing or unreadable wav or a wrong sample rate.

    Checks every file of a split of up to ``MAX_CHECKED_FILES`` files (the embedded data), else that many
    evenly spaced ones (a real ``train-360`` has some 150k: reading every header would cost
    minutes at each start); :class:`CheckedLibriMix` names any other bad file when it is read.
    """
    columns = [c for c in dataset.df.columns if c.endswith("_path")]
    paths = dataset.df[columns].to_numpy().ravel()
    if len(paths) > MAX_CHECKED_FILES:
        paths = paths[np.linspace(0, len(paths) - 1, MAX_CHECKED_FILES).astype(int)]
    for path in paths:
        try:
            rate = sf.info(path).samplerate
        except AUDIO_ERRORS as error:
            raise RecipeError(f"{path}: missing or unreadable audio ({error})") from None
        if rate != sample_rate:
            raise RecipeError(f"{path}: sample rate {rate} Hz, but data.sample_rate is {sample_rate} Hz")


def layer_weight_bits(path: str | None) -> dict[str, int]:
    try:
        return read_layer_weight_bits(path)
    except ValueError as error:
        raise RecipeError(f"quant.layer_weight_bits={path}: {error}") from None


def quant_config(conf: dict) -> QuantConfig:
    quant = conf["quant"]
    preset = QuantConfig.fqss if quant["mode"] == "fqss" else QuantConfig.vanilla
    optional = {key: quant[key] for key in ("calib_method", "quantizer_lr", "weight_init", "decoder_in_splits", "encoder_out_splits")
                if key in quant}
    return preset(weight_bits=quant["weight_bits"], act_bits=quant["act_bits"], calib_steps=quant["calib_steps"],
                  layer_weight_bits=layer_weight_bits(quant.get("layer_weight_bits")), **optional)


def check_model_keys(conf: dict, model_class: type) -> None:
    """Asteroid models pass unknown keyword arguments on to their filterbank, which ignores them: a
    ``filterbank``/``masknet`` key that ``model_class`` does not name is a :class:`RecipeError`."""
    import inspect
    named = {name for name, p in inspect.signature(model_class).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    for section in ("filterbank", "masknet"):
        unknown = sorted(set(conf.get(section) or {}) - named)
        if unknown:
            raise RecipeError(f"filterbank/masknet: {section}.{unknown[0]} is not an argument of "
                              f"{model_class.__name__} (it takes {', '.join(sorted(named))})")


def build_models(conf: dict, build_float: Callable[[dict], nn.Module],
                 config: QuantConfig | None) -> tuple[nn.Module, nn.Module | None]:
    """(model to train, float teacher or None) for the configured mode (``config`` is None in float mode)."""
    mode, pretrained = conf["quant"]["mode"], conf["main_args"]["pretrained"]
    if config is None:
        if pretrained:
            return load_float_model(pretrained), None
        try:
            model = build_float(conf)
        except TypeError as error:          # a filterbank/masknet key the model does not take
            raise RecipeError(f"filterbank/masknet: {error}") from None
        check_model_keys(conf, type(model))
        return model, None
    if not pretrained:
        raise RecipeError(f"quant.mode={mode} needs --pretrained (the float model: hub id, directory or file)")
    teacher = load_float_model(pretrained)
    student = prepare_model(copy.deepcopy(teacher), config)
    return student, teacher


def check_resumable(checkpoint: Path, system: pl.LightningModule) -> None:
    """Refuse, with one message naming ``checkpoint``, a ``last.ckpt`` this run cannot resume from.

    Lightning would otherwise fail deep inside ``load_state_dict`` (another architecture or
    quantization mode in the same ``exp_dir``), or inside the optimizer (a QAT checkpoint written
    before the quantizer ranges got their own parameter group).
    """
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        saved, groups = state["state_dict"], state["optimizer_states"][0]["param_groups"]
    except (OSError, RuntimeError, KeyError, IndexError, pickle.UnpicklingError) as error:
        raise RecipeError(f"{checkpoint}: not a readable Lightning checkpoint ({error}); "
                          f"delete it to start this run from scratch") from None
    expected = system.state_dict()
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & saved.keys() if saved[k].shape != expected[k].shape)
    hint = "it was written by another conf in this exp_dir: use a new --exp_dir, or delete it to start afresh"
    if missing or unexpected or reshaped:
        first = (missing or unexpected or reshaped)[0]
        raise RecipeError(f"{checkpoint}: does not match this model ({len(missing)} missing, {len(unexpected)} "
                          f"unexpected, {len(reshaped)} reshaped tensors, e.g. {first!r}); {hint}")
    optimizer = system.optimizer
    if len(groups) != len(optimizer.param_groups):
        raise RecipeError(f"{checkpoint}: its optimizer has {len(groups)} parameter group(s), this run has "
                          f"{len(optimizer.param_groups)} (weights, and quantizer ranges at quant.quantizer_lr); "
                          f"{hint} (a QAT checkpoint from before quantizer_lr: repackage it with "
                          f"write_best_model and pass that as --pretrained)")


def make_loaders(conf: dict) -> tuple[DataLoader, DataLoader]:
    """Training loader on random ``data.segment`` crops; validation on the whole dev mixtures.

    Validation sees the same signal every epoch, one mixture at a time. (Asteroid's egs validate on
    random crops, new ones each epoch: with 1 s crops the epoch-to-epoch spread of ``val_loss``,
    about 0.2 dB, exceeds what a QAT epoch changes, and best-checkpoint selection picked the epoch
    whose crops happened to be easiest.)
    """
    workers = conf["training"]["num_workers"]
    train_loader = DataLoader(make_dataset(conf, "train-360", conf["data"]["segment"]), shuffle=True, drop_last=True,
                              batch_size=conf["training"]["batch_size"], num_workers=workers)
    val_loader = DataLoader(make_dataset(conf, "dev", None), batch_size=1, num_workers=workers, shuffle=False)
    return train_loader, val_loader


class LastCheckpoint(Checkpoint):
    """Write ``last.ckpt`` at the end of *every* training epoch (atomically, as every checkpoint of
    :func:`make_trainer`'s trainer).

    Lightning's ``ModelCheckpoint(save_last=True)`` only refreshes ``last.ckpt`` when a top-k
    checkpoint is saved, so a run interrupted after epochs that did not improve would resume from
    the last improvement and redo them; a half-written file is never left either. A ``Checkpoint``
    subclass, so that Lightning runs it after the ``ModelCheckpoint`` listed before it: ``last.ckpt``
    then holds the top-k record *with* this epoch's entry (as a plain ``Callback`` it ran first, and a
    resumed run lost the last epoch from its top-k record).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)                 # atomic through AtomicCheckpointIO


def writable_dir(path: Path, flag: str) -> Path:
    """``path`` as a directory this process can write to (made if needed), checked before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fqss-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RecipeError(f"{flag} {path}: not a directory this run can write to "
                          f"({error.strerror or type(error).__name__})") from None
    return path


def start_experiment(conf: dict) -> Path:
    """``--exp_dir`` (and its ``checkpoints/``) checked writable, ``conf.yml`` written, the seed set."""
    exp_dir = writable_dir(Path(conf["main_args"]["exp_dir"]), "--exp_dir")
    writable_dir(exp_dir / "checkpoints", "--exp_dir")
    with open(exp_dir / "conf.yml", "w") as handle:
        yaml.safe_dump(conf, handle)
    pl.seed_everything(conf["training"]["seed"], workers=True)
    return exp_dir


def make_loss(conf: dict) -> nn.Module:
    """Float: Asteroid's PIT negative SI-SDR; QAT: :class:`~fqss_plugin.FQSSLoss` (no distillation for vanilla)."""
    mode = conf["quant"]["mode"]
    if mode == "float":
        return PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    return FQSSLoss(lambda_kd=conf["quant"]["lambda_kd"] if mode == "fqss" else 0.0,
                    average=conf["quant"].get("loss_average", "linear"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomically: every checkpoint (top-k, ``last.ckpt``) is the earlier file or
    the whole new one, whenever the process is killed (:func:`~fqss_plugin.atomic.atomic_save`)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_save(checkpoint, Path(path))


def make_trainer(conf: dict, exp_dir: Path) -> tuple[pl.Trainer, ModelCheckpoint]:
    """The Lightning ``Trainer`` with Asteroid's callbacks (top-3 ``ModelCheckpoint`` on ``val_loss``,
    ``EarlyStopping``) plus ``checkpoints/last.ckpt`` after every epoch (for resuming), and a CSV logger;
    checkpoints are written atomically (:class:`AtomicCheckpointIO`)."""
    checkpoint_dir = exp_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, monitor="val_loss", mode="min", save_top_k=3, verbose=True)
    callbacks = [checkpoint, LastCheckpoint(checkpoint_dir / "last.ckpt")]
    if conf["training"]["early_stop"]:
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=30))
    trainer = pl.Trainer(max_epochs=conf["training"]["epochs"], callbacks=callbacks, default_root_dir=str(exp_dir),
                         logger=CSVLogger(str(exp_dir), name="lightning_logs"), accelerator="auto", devices=1,
                         gradient_clip_val=conf["training"]["gradient_clip"],
                         limit_train_batches=conf["training"]["limit_train_batches"],
                         limit_val_batches=conf["training"]["limit_val_batches"],
                         enable_progress_bar=conf["training"]["progress_bar"], deterministic="warn",
                         plugins=[AtomicCheckpointIO()])
    return trainer, checkpoint


def fit(trainer: pl.Trainer, system: pl.LightningModule, exp_dir: Path) -> Path:
    """``trainer.fit``, resumed from ``checkpoints/last.ckpt`` when a run left one (checked first); writes
    ``best_k_models.json`` and returns the best checkpoint (``last.ckpt`` when none was scored)."""
    checkpoint_dir = exp_dir / "checkpoints"
    last = checkpoint_dir / "last.ckpt"
    if last.is_file():
        check_resumable(last, system)
    trainer.fit(system, ckpt_path=str(last) if last.is_file() else None)
    best_k = top_k_scores(checkpoint_dir)
    with open(exp_dir / "best_k_models.json", "w") as handle:
        json.dump({str(path): score for path, score in best_k.items()}, handle, indent=0)
    return min(best_k, key=best_k.get) if best_k else last


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint (weights only); an unreadable one is a :class:`RecipeError` naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, corrupt or foreign files: one clear message
        raise RecipeError(f"{path}: unreadable checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                          "delete it (or the run) and train again") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise RecipeError(f"{path}: not a Lightning checkpoint of this recipe (no state_dict)")
    return state


def top_k_scores(checkpoint_dir: Path) -> dict[Path, float]:
    """``val_loss`` of every top-k checkpoint file in ``checkpoint_dir``, as recorded in the file itself.

    Read from the files rather than from the callback's state, so that a resumed, a finished and rerun,
    or a moved run all pick the best of the checkpoints they actually have.
    """
    scores = {}
    for path in sorted(checkpoint_dir.glob("epoch=*.ckpt")):
        callbacks = load_checkpoint(path).get("callbacks", {})
        for key, state in callbacks.items():
            if key.startswith("ModelCheckpoint") and state.get("current_score") is not None:
                scores[path] = float(state["current_score"])
    return scores


def write_best_model(conf: dict, model: nn.Module, checkpoint: str | Path) -> Path:
    """Load a Lightning checkpoint's weights into ``model`` and write ``<exp_dir>/best_model.pth``.

    Also the way to package a float teacher from a run that is still going (or was interrupted):
    ``write_best_model(conf, build_float_model(conf), "exp/float/checkpoints/last.ckpt")``.
    """
    state = load_checkpoint(Path(checkpoint))["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    mode = conf["quant"]["mode"]
    infos = {"seed": conf["training"]["seed"], "training_mode": mode, "pretrained": conf["main_args"]["pretrained"],
             "checkpoint": Path(checkpoint).name}
    path = Path(conf["main_args"]["exp_dir"]) / "best_model.pth"
    if mode == "float":
        package = with_plain_versions(model.serialize())
        package["infos"].update(infos)
        return atomic_save(package, path)
    return save_quantized_model(model, path, quant_config(conf), infos)


def load_model(path: str | Path) -> nn.Module:
    """A float or quantized model written by :func:`train` (the one documented reload call)."""
    try:
        return load_quantized_model(path)
    except ValueError as error:
        if "not a quantized fqss model" not in str(error):
            raise
        return load_float_model(path)


@torch.no_grad()
def score_test_set(model: nn.Module, conf: dict, metrics: list[str] = METRICS, desc: str = "evaluating") -> list[dict]:
    """Asteroid's metrics (``get_metrics``, PIT-reordered estimates) for every test mixture."""
    model.eval()
    test_set = make_dataset(conf, conf["data"].get("test_split", "test"), None)
    loss = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    rows = []
    for mix, sources, mixture_id in tqdm(test_set, desc=desc, disable=not conf["training"]["progress_bar"]):
        _, estimate = loss(model(mix[None]), sources[None], return_est=True)
        values = get_metrics(mix.numpy(), sources.numpy(), estimate[0].numpy(), sample_rate=conf["data"]["sample_rate"],
                             metrics_list=metrics)
        rows.append({"mixture_ID": mixture_id, **{k: float(v) for k, v in values.items()}})
    return rows


def evaluate(conf: dict, model_path: str | Path | None = None, out_dir: str | Path | None = None,
             metrics: list[str] = METRICS) -> dict:
    """Asteroid's ``eval.py``: metrics per test mixture (``all_metrics.csv``) and their means (``final_metrics.json``).

    ``<metric>_imp`` is the mean improvement over the mixture (``si_sdr_imp`` is the SI-SDRi).
    """
    exp_dir = Path(conf["main_args"]["exp_dir"])
    rows = score_test_set(load_model(model_path or exp_dir / "best_model.pth"), conf, metrics)
    split = conf["data"].get("test_split", "test")
    out = Path(out_dir or exp_dir / ("eval" if split == "test" else f"eval_{split}"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "all_metrics.csv", "w") as handle:
        handle.write(",".join(rows[0]) + "\n")
        handle.writelines(",".join(str(v) for v in row.values()) + "\n" for row in rows)
    final = {}
    for metric in metrics:
        values = torch.tensor([row[metric] for row in rows])
        inputs = torch.tensor([row[f"input_{metric}"] for row in rows])
        final[metric] = float(values.mean())
        final[f"{metric}_imp"] = float((values - inputs).mean())
    with open(out / "final_metrics.json", "w") as handle:
        json.dump(final, handle, indent=2)
    return final


def conf_from_argv(argv: list[str]) -> dict:
    conf_path = argv[argv.index("--conf") + 1] if "--conf" in argv else "conf/fqss.yml"
    conf = parse_conf(conf_path, argv)
    conf["main_args"]["exp_dir"] = conf["main_args"]["exp_dir"] or f"exp/{conf['quant']['mode']}"
    return conf


def run(main: Callable[[dict], Path], argv: list[str] | None = None) -> int:
    """A recipe's ``train.py`` entry point: parse ``--conf`` + flags, ``main(conf)``, errors in one line."""
    return run_recipe(lambda: print(f"best model: {main(conf_from_argv(sys.argv[1:] if argv is None else argv))}"))


def run_eval(argv: list[str] | None = None) -> int:
    """A recipe's ``eval.py`` main: evaluate ``<exp_dir>/best_model.pth`` on the test split."""
    try:
        print(json.dumps(evaluate(conf_from_argv(sys.argv[1:] if argv is None else argv)), indent=2))
    except (RecipeError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
