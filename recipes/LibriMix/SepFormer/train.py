#!/usr/bin/env python3
"""Recipe for a float, vanilla-QAT or FQSS-QAT SepFormer on Libri2Mix (SpeechBrain).

The SpeechBrain LibriMix separation recipe with the fqss Brain
(:class:`fqss_plugin.speechbrain.FQSSSeparation`); which model is trained is decided by the yaml:

> python train.py hparams/sepformer-float.yaml   --data_folder /data/Libri2Mix
> python train.py hparams/sepformer-fqss.yaml    --data_folder /data/Libri2Mix
> python train.py hparams/sepformer-vanilla.yaml --data_folder /data/Libri2Mix --pretrained_path DIR_OR_HUB_ID
> torchrun --nproc_per_node=2 train.py hparams/sepformer-fqss.yaml --data_folder ... --distributed_backend=gloo --device cpu

Embedded data (``fqss make-data speech --out data/librimix`` at the repository root):

> python train.py hparams/sepformer-embedded-float.yaml --device cpu
> python train.py hparams/sepformer-embedded-fqss.yaml  --device cpu

Outputs in ``results/<experiment_name>/<seed>/``: ``train_log.txt``, ``log.txt``,
``hyperparams.yaml``, ``save/CKPT+*`` (quantizer state included), ``test_results.csv`` and
``pretrained/`` (an inference package for ``SepformerSeparation.from_hparams``).
"""
import sys
import warnings
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml

import speechbrain as sb
from speechbrain.utils.distributed import if_main_process, run_on_main

from fqss_plugin.data.librimix import prepare_librimix_csv
from fqss_plugin.speechbrain import FQSSSeparation, save_pretrained_separator

SPLITS = ("train-360", "dev", "test")


def prepare_librimix(datapath, savepath, n_spks=2, skip_prep=False, fs=8000):
    """SpeechBrain's ``prepare_librimix`` (``libri2mix_<split>.csv`` manifests in ``savepath``)."""
    if skip_prep:
        return
    if n_spks != 2:
        raise ValueError(f"num_spks: this recipe prepares Libri2Mix only, got num_spks={n_spks}")
    if not Path(datapath).is_dir():
        raise FileNotFoundError(f"--data_folder {datapath}: no such directory (the Libri2Mix folder holding "
                                f"wav{fs // 1000}k/min/{{train-360,dev,test}}; generate the embedded one with "
                                f"`fqss make-data speech --out DIR` and pass DIR/Libri2Mix)")
    prepare_librimix_csv(datapath, savepath, fs=fs, splits=SPLITS)


def dataio_prep(hparams):
    """Datasets of the recipe's CSV manifests, reading ``mix_sig``, ``s1_sig``, ``s2_sig`` with soundfile."""
    datasets = [sb.dataio.dataset.DynamicItemDataset.from_csv(csv_path=hparams[key])
                for key in ("train_data", "valid_data", "test_data")]
    if not len(datasets[0]):
        raise ValueError(f"{hparams['train_data']}: no training mixture")
    keys = ["mix", "s1", "s2"] + (["noise"] if hparams["use_wham_noise"] else [])
    for key in keys:
        def read(path):
            return sb.dataio.dataio.read_audio(path)
        pipeline = sb.utils.data_pipeline.takes(f"{key}_wav")(sb.utils.data_pipeline.provides(f"{key}_sig")(read))
        sb.dataio.dataset.add_dynamic_item(datasets, pipeline)
    sb.dataio.dataset.set_output_keys(datasets, ["id"] + [f"{key}_sig" for key in keys])
    return datasets


def check_pretrained_source(source: str) -> None:
    """A local-looking ``pretrained_path`` must exist (otherwise fetch would take it for a hub id)."""
    if Path(source).is_dir():
        return
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"--pretrained_path {source}: no such directory (a local directory with "
                                f"encoder.ckpt, masknet.ckpt and decoder.ckpt, or a hub id such as "
                                f"speechbrain/sepformer-libri2mix)")


def check_precision(hparams: dict, run_opts: dict) -> None:
    """QAT needs fp32: under fp16/bf16 autocast the quantizers would put rounded values on their grids (measured
    31 dB away from fp32). A float run on CPU takes bf16 for fp16 (CPUs have no fp16 autocast), with a warning."""
    precision = run_opts.get("precision") or hparams.get("precision", "fp32")
    if precision != "fp32" and "quant" in hparams:
        raise ValueError(f"precision: {precision}: fqss QAT runs in fp32 only (set `precision: fp32` or pass "
                         "--precision fp32)")
    if run_opts.get("device") == "cpu" and precision == "fp16":
        warnings.warn("precision fp16 on CPU: running bf16 autocast instead", stacklevel=2)
        hparams["precision"] = "bf16"


def check_debug_keeps_finished_run(hparams: dict, run_opts: dict) -> None:
    """``--debug`` shares ``output_folder`` with the real run: refuse it there once that run has written results."""
    out = Path(hparams["output_folder"])
    finished = [p for p in (out / "test_results.csv", out / "pretrained") if p.exists()]
    if run_opts.get("debug") and finished:
        raise FileExistsError(f"--debug would overwrite the finished run in {out} ({finished[0].name}); pass "
                              "--output_folder <another folder> for the debug run")


def main(argv=None):
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:] if argv is None else argv)
    if not Path(hparams_file).is_file():
        raise FileNotFoundError(f"{hparams_file}: no such hparams file")
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)

    check_precision(hparams, run_opts)
    check_debug_keeps_finished_run(hparams, run_opts)
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=overrides)

    run_on_main(prepare_librimix, kwargs={"datapath": hparams["data_folder"], "savepath": hparams["save_folder"],
                                          "n_spks": hparams["num_spks"], "skip_prep": hparams["skip_prep"],
                                          "fs": hparams["sample_rate"]})
    train_data, valid_data, test_data = dataio_prep(hparams)

    # pretrained float weights (hub id or local directory), into the (quantized) modules
    if "pretrained_separator" in hparams:
        check_pretrained_source(str(hparams.get("pretrained_path", "")))
        run_on_main(hparams["pretrained_separator"].collect_files)
        hparams["pretrained_separator"].load_collected()

    separator = FQSSSeparation(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams,
                               run_opts=run_opts, checkpointer=hparams["checkpointer"])
    if "pretrained_separator" not in hparams:
        for module in separator.modules.values():
            separator.reset_layer_recursively(module)

    separator.fit(separator.hparams.epoch_counter, train_data, valid_data,
                  train_loader_kwargs=hparams["dataloader_opts"], valid_loader_kwargs=hparams["dataloader_opts"])

    separator.evaluate(test_data, min_key="si-snr")
    if if_main_process():
        separator.save_results(test_data)
        quant = hparams.get("quant") or {}
        package = save_pretrained_separator(Path(hparams["output_folder"]) / "pretrained", hparams["modules"],
                                            quant.get("config"), hparams["sample_rate"], hparams["num_spks"])
        print(f"inference package: {package} (SepformerSeparation.from_hparams(source=...))")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return separator


if __name__ == "__main__":
    main()
