#!/usr/bin/env python3
"""Train the music ConvTasNet on MUSDB18-HQ: float, vanilla QAT or FQSS QAT, with Demucs' data pipeline.

    python train.py conf/float.yaml   dset.musdb=/data/musdb18hq
    python train.py conf/vanilla.yaml dset.musdb=/data/musdb18hq pretrained=exp/float/best_model.pth
    python train.py conf/fqss.yaml    dset.musdb=/data/musdb18hq pretrained=exp/float/best_model.pth
    torchrun --nproc_per_node=2 train.py conf/fqss.yaml ...     # DDP on CPUs (gloo): the batch is split over ranks

The model is :class:`fqss_plugin.asteroid.StereoConvTasNet` (Asteroid's masker with multichannel filterbanks: the
music ConvTasNet of Demucs v2, which Demucs 4 no longer has); it is an Asteroid model, so its package is
Asteroid's (``best_model.pth``: ``StereoConvTasNet.from_pretrained`` reloads the float one, and, once
``fqss_plugin.asteroid`` is imported, the quantized one). Data, augmentation, the L1 loss, chunked inference and
museval come from :mod:`fqss_plugin.demucs.recipe`, as in the HTDemucs recipe: keys of the yaml are overridden as
``dotted.key=value``; a run resumes from ``<exp_dir>/checkpoint.th``; ``<exp_dir>/test_results.json`` holds the test.
"""
import copy

from omegaconf import OmegaConf

from fqss_plugin.asteroid import StereoConvTasNet, prepare_model, resolve_package, save_quantized_model
from fqss_plugin.asteroid.package import is_quantized_package, load_float_model, load_quantized_model, \
    with_plain_versions
from fqss_plugin.atomic import atomic_save
from fqss_plugin.demucs.recipe import (ModelIO, RecipeError, load_pretrained, main as train_main, pretrained_path,
                                      quant_config, run)


def load_float(path):
    """A float Asteroid package (file, folder or hub id); a quantized or unreadable one is a :class:`RecipeError`."""
    try:
        return load_float_model(path)
    except ValueError as error:
        raise RecipeError(f"pretrained: {error}") from None


def build_models(conf):
    """(model to train, float teacher or None, QuantConfig or None) for ``quant.mode``."""
    if conf.quant.mode == "float":
        model = load_pretrained(load_float, conf.pretrained) if conf.pretrained else \
            StereoConvTasNet(sources=list(conf.dset.sources), audio_channels=conf.dset.channels,
                             sample_rate=conf.dset.samplerate, **OmegaConf.to_container(conf.convtasnet))
        return model, None, None
    teacher = load_pretrained(load_float, pretrained_path(conf)).eval().requires_grad_(False)
    if not isinstance(teacher, StereoConvTasNet):
        raise RecipeError(f"pretrained={conf.pretrained}: a {type(teacher).__name__}, not a StereoConvTasNet")
    config = quant_config(conf, normalize_input=False)      # the method's music splitter: no normalisation
    return prepare_model(copy.deepcopy(teacher).train().requires_grad_(True), config), teacher, config


def save_package(model, config, conf, path):
    """Asteroid's package (``model_name``, ``model_args``, ``state_dict``) of a float or quantized model."""
    if config is not None:
        return save_quantized_model(model, path)
    return atomic_save(with_plain_versions(model.serialize()), path)


def load_package(path):
    return load_quantized_model(path) if is_quantized_package(resolve_package(path)) else load_float_model(path)


MODEL = ModelIO(build=build_models, save=save_package, load=load_package, package_name="best_model.pth")


def main(argv=None):
    return train_main(argv, MODEL)


if __name__ == "__main__":
    run(main)
