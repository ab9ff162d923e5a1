"""The building blocks of the MUSDB18-HQ recipes (``recipes/MUSDB18/*``), whose ``train.py`` composes them.

They follow Demucs' own training: a yaml conf whose keys are overridden as ``dotted.key=value``,
``demucs.wav.get_musdb_wav_datasets`` (MUSDB18-HQ wav folders, read through soundfile), ``demucs.augment``
(shift, flips, scale, remix), the L1 loss (with the sample-weighted distillation of
``fqss_plugin.FQSSLoss(task="l1")`` in FQSS mode), validation by ``demucs.apply.apply_model`` on whole tracks
(nSDR), and the test with museval (:mod:`fqss_plugin.music_eval`). Any model that takes ``[batch, channels,
time]`` and returns ``[batch, sources, channels, time]`` with Demucs' attributes (``samplerate``, ``segment``,
``sources``) trains here; the recipe gives how to build, save and load it (:class:`ModelIO`).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..atomic import atomic_path, atomic_save
from ..loss import FQSSLoss
from ..quant import QuantConfig, attach_calibration, parameter_groups
from ..quant.config import read_layer_weight_bits
from ..music_eval import evaluate_musdb, nsdr
from ..recipe_errors import RecipeError, first_line, run_recipe
from .audio_io import use_soundfile_backend

PRESETS = {"vanilla": QuantConfig.vanilla, "fqss": QuantConfig.fqss}
MODES = ("float", *PRESETS)


@dataclass
class ModelIO:
    """What a recipe tells the training loop about its model.

    ``build(conf)`` returns ``(model, teacher or None, QuantConfig or None)`` for ``conf.quant.mode``;
    ``save(model, config, conf, path)`` writes the package of the best epoch; ``load(path)`` reads it back
    for the test; ``package_name`` is that file's name in the experiment folder.
    """

    build: Callable
    save: Callable
    load: Callable
    package_name: str


def load_conf(argv: list[str]):
    """The yaml (merged over its ``defaults`` yaml) with ``dotted.key=value`` overrides of existing keys."""
    if not argv or not Path(argv[0]).is_file():
        raise RecipeError(f"usage: train.py CONF.yaml [key=value ...]; {argv[0] if argv else 'no conf'}: no such file")
    try:
        conf = OmegaConf.load(argv[0])
        if "defaults" in conf:                      # a key that the defaults yaml does not have is an error
            base = OmegaConf.load(Path(argv[0]).parent / conf.pop("defaults"))
            OmegaConf.set_struct(base, True)
            conf = OmegaConf.merge(base, conf)
        OmegaConf.set_struct(conf, True)           # so is an override of a key that does not exist
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(argv[1:]))
    except OmegaConfBaseException as error:
        raise RecipeError(f"{argv[0]}: {str(error).splitlines()[0]}") from None
    if conf.quant.mode not in MODES:
        raise RecipeError(f"quant.mode={conf.quant.mode}: expected one of {', '.join(MODES)}")
    check_values(conf)
    if conf.quant.mode != "float":
        quant_config(conf)                         # a bad quantization setting is named before any loading
    return conf


def check_values(conf) -> None:
    """A clear error for a value the training would only choke on later (a negative segment, a batch the remix
    augmentation cannot split into its groups)."""
    positive = ("dset.segment", "dset.shift", "dset.samplerate", "optim.lr", "optim.batch_size")
    for key in positive:
        value = OmegaConf.select(conf, key)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise RecipeError(f"{key}={value}: expected a positive number")
    if not isinstance(conf.optim.epochs, int) or conf.optim.epochs < 0:
        raise RecipeError(f"optim.epochs={conf.optim.epochs}: expected a non-negative integer")
    remix = OmegaConf.select(conf, "augment.remix")
    if remix is not None and remix.proba > 0 and conf.optim.batch_size % remix.group_size:
        raise RecipeError(f"optim.batch_size={conf.optim.batch_size}: Demucs' remix augmentation shuffles sources "
                          f"within groups of augment.remix.group_size={remix.group_size} examples; use a multiple of "
                          f"it (or augment.remix.proba=0)")


def quant_config(conf, **fixed) -> QuantConfig:
    """The preset of ``quant.mode`` with the conf's bits, calibration and quantizer lr (``fixed`` on top)."""
    try:
        layer_bits = read_layer_weight_bits(conf.quant.layer_weight_bits)
    except ValueError as error:
        raise RecipeError(f"quant.layer_weight_bits={conf.quant.layer_weight_bits}: {error}") from None
    splits = OmegaConf.select(conf, "quant.layer_act_splits")
    if splits is not None and not OmegaConf.is_dict(splits):
        raise RecipeError(f"quant.layer_act_splits={splits}: expected a mapping {{module name: splits}} or null")
    try:
        return PRESETS[conf.quant.mode](weight_bits=conf.quant.weight_bits, act_bits=conf.quant.act_bits,
                                        calib_steps=conf.quant.calib_steps, calib_method=conf.quant.calib_method,
                                        quantizer_lr=conf.quant.quantizer_lr, layer_weight_bits=layer_bits,
                                        layer_act_splits=OmegaConf.to_container(splits) if splits else {}, **fixed)
    except ValueError as error:
        raise RecipeError(f"quant: {error}") from None


def load_pretrained(load: Callable[[object], nn.Module], path) -> nn.Module:
    """``load(path)`` (the recipe's package loader), with a clear error naming a file that is no such package."""
    try:
        return load(path)
    except FileNotFoundError:
        raise RecipeError(f"pretrained={path}: no such file") from None
    except RecipeError:
        raise
    except Exception as error:                     # a corrupt, truncated or foreign file: unpickling fails anywhere
        raise RecipeError(f"pretrained={path}: not a readable model package ({first_line(error)})") from None


def pretrained_path(conf, names: bool = False) -> Path | str:
    """``pretrained``, the float package a QAT run starts from (a clear error when it is missing); with
    ``names``, a value that is no path (no file, no ``.th`` suffix) is passed on as a model name (``htdemucs``,
    ``hf://<namespace>/<name>``) for the recipe's loader."""
    path = Path(str(conf.pretrained or ""))
    if conf.pretrained and path.is_file():
        return path
    if conf.pretrained and names and not path.exists() and path.suffix != ".th":
        return str(conf.pretrained)
    expected = "<float package (.th) or Demucs model name>" if names else "<float package>"
    raise RecipeError(f"quant.mode={conf.quant.mode} needs pretrained={expected} (got {conf.pretrained})")


def make_datasets(conf):
    """Demucs' MUSDB18-HQ wav datasets (train minus the validation tracks, validation on whole tracks)."""
    from demucs.wav import get_musdb_wav_datasets

    root = Path(conf.dset.musdb)
    if not (root / "train").is_dir():
        raise RecipeError(f"dset.musdb={root}: no train/ folder in MUSDB18-HQ layout (generate the toy one with "
                          f"`fqss make-data music --out {root}`)")
    use_soundfile_backend()
    return get_musdb_wav_datasets(SimpleNamespace(**OmegaConf.to_container(conf.dset, resolve=True)))


def make_augment(conf) -> nn.Module:
    """Demucs' training augmentation: random shift, channel and sign flips, scale, remix across the batch."""
    from demucs import augment

    augments = [augment.Shift(shift=int(conf.dset.samplerate * conf.dset.shift), same=conf.augment.shift_same)]
    if conf.augment.flip:
        augments += [augment.FlipChannels(), augment.FlipSign()]
    augments += [augment.Scale(**conf.augment.scale)]
    if conf.augment.remix.proba > 0:
        augments += [augment.Remix(**conf.augment.remix)]
    return nn.Sequential(*augments)


@torch.no_grad()
def validate(model: nn.Module, valid_set) -> float:
    """Mean nSDR over the validation tracks and sources (whole tracks through ``apply_model``)."""
    from demucs.apply import apply_model

    model.eval()
    scores = []
    for mixture, *stems in (valid_set[i] for i in range(len(valid_set))):
        estimate = apply_model(model, mixture[None], split=True, overlap=0.25, progress=False)[0]
        scores += [nsdr(stem.numpy(), est.numpy()) for stem, est in zip(stems, estimate)]
    return sum(scores) / len(scores)


def main(argv: list[str] | None, io: ModelIO) -> Path:
    """Train (resuming from ``<exp_dir>/checkpoint.th``), keep the best validation epoch, test it with museval.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the ranks train with DDP over gloo: the batch is split over them,
    their quantizers calibrate in step, rank 0 validates and writes. Returns the best package's path.
    """
    conf = load_conf(sys.argv[1:] if argv is None else argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")        # torchrun on CPUs
    main_rank = not distributed or torch.distributed.get_rank() == 0
    torch.manual_seed(conf.seed)
    exp_dir = Path(conf.exp_dir)
    if main_rank:
        exp_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(conf, exp_dir / "conf.yaml")
    model, teacher, config = io.build(conf)
    if distributed:                                          # Demucs' metadata cache: written by rank 0 first
        import demucs.distrib
        demucs.distrib.init()
    train_set, valid_set = make_datasets(conf)
    params = model.parameters() if config is None else parameter_groups(model, config.quantizer_lr)
    optimizer = torch.optim.Adam(params, lr=conf.optim.lr)
    if config is not None:
        attach_calibration(optimizer, model)     # a calibration step after every optimizer step
    loss_fn = FQSSLoss(lambda_kd=conf.quant.get("lambda_kd", 0.0), task="l1")
    augmentation = make_augment(conf)

    checkpoint, history, best, start = exp_dir / "checkpoint.th", [], float("-inf"), 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, start = state["history"], state["best"], state["epoch"]
        print(f"resuming {exp_dir} after epoch {start}")
    sampler = DistributedSampler(train_set, shuffle=True, seed=conf.seed, drop_last=True) if distributed else None
    per_rank = conf.optim.batch_size // (torch.distributed.get_world_size() if distributed else 1)
    loader = DataLoader(train_set, batch_size=max(per_rank, 1), shuffle=sampler is None, sampler=sampler,
                        drop_last=True, generator=torch.Generator().manual_seed(conf.seed + start))
    trained = DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    if not len(loader):
        raise RecipeError(f"{len(train_set)} training examples: fewer than optim.batch_size={conf.optim.batch_size}")
    best_path = exp_dir / io.package_name
    for epoch in range(start, conf.optim.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        total = 0.0
        for sources in loader:
            sources = augmentation(sources)
            mix = sources.sum(dim=1)
            teacher_estimate = None
            if teacher is not None and loss_fn.lambda_kd > 0:
                with torch.no_grad():
                    teacher_estimate = teacher(mix)
            loss = loss_fn(trained(mix), sources, teacher_estimate)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), conf.optim.clip_grad)
            optimizer.step()
            total += float(loss.detach())
        row = {"epoch": epoch + 1, "train_loss": total / len(loader)}
        if not main_rank:                                    # rank 0 validates and writes
            continue
        if (epoch + 1) % conf.valid_every == 0 or epoch + 1 == conf.optim.epochs:
            row["valid_nsdr"] = validate(model, valid_set)
            if row["valid_nsdr"] > best:
                best = row["valid_nsdr"]
                io.save(model, config, conf, best_path)
        history.append(row)
        print(json.dumps(row))
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "history": history, "best": best}, checkpoint)
        with atomic_path(exp_dir / "history.json") as tmp:
            tmp.write_text(json.dumps(history, indent=1))

    if distributed:
        torch.distributed.barrier()
        if not main_rank:
            return best_path
    results = test(io.load(best_path).eval(), conf)
    with atomic_path(exp_dir / "test_results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    print(f"test: SDR {results['sdr_median']:.3f} (median of medians), nSDR {results['nsdr']:.3f}")
    return best_path


def separator(model: nn.Module, shifts: int = 1, overlap: float = 0.25) -> Callable:
    """``separate(mixture [frames, channels], rate) -> {source: [frames, channels]}`` as ``demucs.separate``
    does it: the mixture normalised by its mono downmix's mean and std, ``apply_model``, then back."""
    from demucs.apply import apply_model

    def separate(mixture, rate):
        if rate != model.samplerate:
            raise ValueError(f"a {rate} Hz mixture for a {model.samplerate} Hz model")
        mix = torch.from_numpy(mixture.T)
        reference = mix.mean(0)
        with torch.no_grad():
            estimate = apply_model(model, ((mix - reference.mean()) / reference.std())[None],
                                   shifts=shifts, split=True, overlap=overlap, progress=False)[0]
        estimate = estimate * reference.std() + reference.mean()
        return {source: est.numpy().T for source, est in zip(model.sources, estimate)}
    return separate


def test(model: nn.Module, conf) -> dict:
    """museval on the test tracks of ``dset.musdb`` (:func:`fqss_plugin.music_eval.evaluate_musdb`)."""
    return evaluate_musdb(separator(model, conf.test.shifts, conf.test.overlap), conf.dset.musdb)


def run(main_function: Callable[[], object]) -> None:
    """Run a recipe's ``main``: a user error (:data:`~fqss_plugin.recipe_errors.USER_ERRORS`) is one line on
    stderr, exit 1."""
    status = run_recipe(main_function)
    if status:
        sys.exit(status)
