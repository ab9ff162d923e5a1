#!/usr/bin/env python3
"""Train HTDemucs on MUSDB18-HQ: float, vanilla QAT or FQSS QAT, with Demucs' own data, augmentation and inference.

    python train.py conf/float.yaml   dset.musdb=/data/musdb18hq
    python train.py conf/vanilla.yaml dset.musdb=/data/musdb18hq pretrained=exp/float/best.th
    python train.py conf/fqss.yaml    dset.musdb=/data/musdb18hq pretrained=exp/float/best.th
    python train.py conf/fqss.yaml    dset.musdb=/data/musdb18hq pretrained=htdemucs   # Demucs' get_model: the hub
    torchrun --nproc_per_node=2 train.py conf/fqss.yaml ...     # DDP on CPUs (gloo): the batch is split over ranks

Keys of the yaml are overridden as ``dotted.key=value``, as in Demucs' configs. A run resumes from
``<exp_dir>/checkpoint.th`` (model, optimizer, epoch, best score); outputs in ``<exp_dir>``: ``conf.yaml``,
``history.json`` (train loss and validation nSDR per epoch), ``best.th`` (Demucs' package of the best
validation epoch: ``demucs.pretrained.get_model("best", repo=Path(exp_dir))`` reloads it, quantized or
not) and ``test_results.json`` (museval on the test tracks: :mod:`fqss_plugin.music_eval`).
The loop, data and evaluation are :mod:`fqss_plugin.demucs.recipe`'s.
"""
import copy

from demucs.htdemucs import HTDemucs
from demucs.states import load_model, serialize_model
from omegaconf import OmegaConf

from fqss_plugin.atomic import atomic_save
from fqss_plugin.demucs import load_pretrained_htdemucs, prepare_model, save_quantized_model
from fqss_plugin.demucs.recipe import (ModelIO, RecipeError, load_pretrained, main as train_main, pretrained_path,
                                      quant_config, run)
from fqss_plugin.quant import is_quantized


def build_models(conf):
    """(model to train, float teacher or None, QuantConfig or None) for ``quant.mode``."""
    if conf.quant.mode == "float":
        model = load_pretrained(load_pretrained_htdemucs, pretrained_path(conf, names=True)) if conf.pretrained else \
            HTDemucs(sources=list(conf.dset.sources), audio_channels=conf.dset.channels,
                     samplerate=conf.dset.samplerate, **OmegaConf.to_container(conf.htdemucs))
        return model, None, None
    teacher = load_pretrained(load_pretrained_htdemucs, pretrained_path(conf, names=True)).eval().requires_grad_(False)
    if is_quantized(teacher):
        raise RecipeError(f"pretrained={conf.pretrained}: a quantized model; the float teacher is needed")
    config = quant_config(conf)
    return prepare_model(copy.deepcopy(teacher).train().requires_grad_(True), config), teacher, config


def save_package(model, config, conf, path):
    """Demucs' package (``klass``, ``args``, ``kwargs``, ``state``) of a float or quantized HTDemucs."""
    if config is not None:
        return save_quantized_model(model, path)
    return atomic_save(serialize_model(model, conf, half=False), path)


MODEL = ModelIO(build=build_models, save=save_package, load=load_model, package_name="best.th")


def main(argv=None):
    return train_main(argv, MODEL)


if __name__ == "__main__":
    run(main)
