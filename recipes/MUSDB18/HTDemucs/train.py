#!/usr/bin/env python3
"""Train HTDemucs on MUSDB18-HQ: float, vanilla QAT or FQSS QAT, with Demucs' own data, augmentation and inference.

    python train.py conf/float.yaml   dset.musdb=/data/musdb18hq
    python train.py conf/vanilla.yaml dset.musdb=/data/musdb18hq pretrained=exp/float/best.th
    python train.py conf/fqss.yaml    dset.musdb=/data/musdb18hq pretrained=exp/float/best.th
    torchrun --nproc_per_node=2 train.py conf/fqss.yaml ...     # DDP on CPUs (gloo): the batch is split over ranks

Keys of the yaml are overridden as ``dotted.key=value``, as in Demucs' configs. A run resumes from
``<exp_dir>/checkpoint.th`` (model, optimizer, epoch, best score); outputs in ``<exp_dir>``: ``conf.yaml``,
``history.json`` (train loss and validation nSDR per epoch), ``best.th`` (Demucs' package of the best
validation epoch: ``demucs.pretrained.get_model("best", repo=Path(exp_dir))`` reloads it, quantized or
not) and ``test_results.json`` (museval on the test tracks: :mod:`fqss_plugin.music_eval`).
"""
import copy
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from demucs import augment
from demucs.apply import apply_model
from demucs.htdemucs import HTDemucs
from demucs.states import load_model, serialize_model
from demucs.wav import get_musdb_wav_datasets
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import fqss_plugin as fq
from fqss_plugin.atomic import atomic_path, atomic_save
from fqss_plugin.demucs import prepare_model, save_quantized_model
from fqss_plugin.demucs.audio_io import use_soundfile_backend
from fqss_plugin.music_eval import evaluate_musdb, nsdr

PRESETS = {"vanilla": fq.QuantConfig.vanilla, "fqss": fq.QuantConfig.fqss}


class RecipeError(ValueError):
    """A problem with the recipe's inputs, stated for the user."""


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
        return OmegaConf.merge(conf, OmegaConf.from_dotlist(argv[1:]))
    except OmegaConfBaseException as error:
        raise RecipeError(f"{argv[0]}: {str(error).splitlines()[0]}") from None


def make_datasets(conf):
    """Demucs' MUSDB18-HQ wav datasets (train minus the validation tracks, validation on whole tracks)."""
    root = Path(conf.dset.musdb)
    if not (root / "train").is_dir():
        raise RecipeError(f"dset.musdb={root}: no train/ folder in MUSDB18-HQ layout (generate the toy one with "
                          f"`fqss make-data music --out {root}`)")
    use_soundfile_backend()
    return get_musdb_wav_datasets(SimpleNamespace(**OmegaConf.to_container(conf.dset, resolve=True)))


def make_augment(conf) -> torch.nn.Module:
    """Demucs' training augmentation: random shift, channel and sign flips, scale, remix across the batch."""
    augments = [augment.Shift(shift=int(conf.dset.samplerate * conf.dset.shift), same=conf.augment.shift_same)]
    if conf.augment.flip:
        augments += [augment.FlipChannels(), augment.FlipSign()]
    augments += [augment.Scale(**conf.augment.scale), augment.Remix(**conf.augment.remix)]
    return torch.nn.Sequential(*augments)


def build_models(conf):
    """(model to train, float teacher or None, QuantConfig or None) for ``quant.mode``."""
    mode = conf.quant.mode
    if mode == "float":
        model = load_model(conf.pretrained) if conf.pretrained else \
            HTDemucs(sources=list(conf.dset.sources), audio_channels=conf.dset.channels,
                     samplerate=conf.dset.samplerate, **OmegaConf.to_container(conf.htdemucs))
        return model, None, None
    if mode not in PRESETS:
        raise RecipeError(f"quant.mode={mode}: expected float, vanilla or fqss")
    if not conf.pretrained or not Path(conf.pretrained).is_file():
        raise RecipeError(f"quant.mode={mode} needs pretrained=<float package .th> (got {conf.pretrained})")
    teacher = load_model(conf.pretrained).eval().requires_grad_(False)
    if fq.quant.is_quantized(teacher):
        raise RecipeError(f"pretrained={conf.pretrained}: a quantized model; the float teacher is needed")
    config = PRESETS[mode](weight_bits=conf.quant.weight_bits, act_bits=conf.quant.act_bits,
                           calib_steps=conf.quant.calib_steps, quantizer_lr=conf.quant.quantizer_lr)
    return prepare_model(copy.deepcopy(teacher).train().requires_grad_(True), config), teacher, config


@torch.no_grad()
def validate(model, valid_set) -> float:
    """Mean nSDR over the validation tracks and sources (whole tracks through ``apply_model``)."""
    model.eval()
    scores = []
    for mixture, *stems in (valid_set[i] for i in range(len(valid_set))):
        estimate = apply_model(model, mixture[None], split=True, overlap=0.25, progress=False)[0]
        scores += [nsdr(stem.numpy(), est.numpy()) for stem, est in zip(stems, estimate)]
    return sum(scores) / len(scores)


def save_package(model, config, conf, path: Path) -> Path:
    if config is not None:
        return save_quantized_model(model, path)
    return atomic_save(serialize_model(model, conf, half=False), path)


def main(argv: list[str] | None = None) -> Path:
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
    model, teacher, config = build_models(conf)
    if distributed:                                          # Demucs' metadata cache: written by rank 0 first
        import demucs.distrib
        demucs.distrib.init()
    train_set, valid_set = make_datasets(conf)
    params = model.parameters() if config is None else fq.parameter_groups(model, config.quantizer_lr)
    optimizer = torch.optim.Adam(params, lr=conf.optim.lr)
    if config is not None:
        fq.attach_calibration(optimizer, model)     # a calibration step after every optimizer step
    loss_fn = fq.FQSSLoss(lambda_kd=conf.quant.get("lambda_kd", 0.0), task="l1")
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
            total += float(loss)
        row = {"epoch": epoch + 1, "train_loss": total / len(loader)}
        if not main_rank:                                    # rank 0 validates and writes
            continue
        if (epoch + 1) % conf.valid_every == 0 or epoch + 1 == conf.optim.epochs:
            row["valid_nsdr"] = validate(model, valid_set)
            if row["valid_nsdr"] > best:
                best = row["valid_nsdr"]
                save_package(model, config, conf, exp_dir / "best.th")
        history.append(row)
        print(json.dumps(row))
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "history": history, "best": best}, checkpoint)
        with atomic_path(exp_dir / "history.json") as tmp:
            tmp.write_text(json.dumps(history, indent=1))

    if distributed:
        torch.distributed.barrier()
        if not main_rank:
            return exp_dir / "best.th"
    best_model = load_model(exp_dir / "best.th").eval()

    def separate(mixture, rate):
        """As ``demucs.separate``: normalised by the mono mixture's mean and std, then back."""
        mix = torch.from_numpy(mixture.T)
        reference = mix.mean(0)
        with torch.no_grad():
            estimate = apply_model(best_model, ((mix - reference.mean()) / reference.std())[None],
                                   shifts=conf.test.shifts, split=True, overlap=conf.test.overlap, progress=False)[0]
        estimate = estimate * reference.std() + reference.mean()
        return {source: est.numpy().T for source, est in zip(best_model.sources, estimate)}

    results = evaluate_musdb(separate, conf.dset.musdb)
    with atomic_path(exp_dir / "test_results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    print(f"test: SDR {results['sdr_median']:.3f} (median of medians), nSDR {results['nsdr']:.3f}")
    return exp_dir / "best.th"


if __name__ == "__main__":
    try:
        main()
    except (RecipeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
