#!/usr/bin/env python3
"""Recipe for a float, vanilla-QAT or FQSS-QAT SepFormer on Libri2Mix (SpeechBrain).

SpeechBrain's LibriMix separation recipe, its Brain decorated with :func:`fqss_plugin.speechbrain.fqss_brain`
(distillation from the float teacher, calibration steps, the quantizers' learning rate); which model
is trained is decided by the yaml:

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
import csv
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.nnet.schedulers import ReduceLROnPlateau
from speechbrain.utils.distributed import if_main_process, run_on_main

from fqss_plugin.data.librimix import prepare_librimix_csv
from fqss_plugin.recipe_errors import RecipeError, run_recipe
from fqss_plugin.speechbrain import fqss_brain, save_pretrained_separator, separate_sources

logger = logging.getLogger(__name__)
SPLITS = ("train-360", "dev", "test")


@fqss_brain
class Separation(sb.Brain):
    """SpeechBrain's LibriMix separation Brain, decorated for FQSS QAT (:func:`fqss_plugin.speechbrain.fqss_brain`).

    It calls ``self.modules.encoder/masknet/decoder`` (not the hparams aliases), so DDP applies, and a
    skipped batch still takes part in DDP's gradient all-reduce; otherwise it is the stock recipe's.
    """

    def separate(self, mix: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` mixture -> ``[B, T, num_spks]`` estimates: ``SepformerSeparation.separate_batch``'s
        computation (encoder, mask net, mask product, decoder per source, cut or padded to ``T``)."""
        modules = self.modules
        return separate_sources(mix, modules["encoder"], modules["masknet"], modules["decoder"],
                                self.hparams.num_spks)

    def prepare_signals(self, mix, targets, stage, noise=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch fields -> (mixture ``[B, T]``, targets ``[B, T, num_spks]``) on the device, with the
        recipe's training augmentations (speed perturbation, random shift, noise, wavedrop, cut)."""
        mix, mix_lens = mix
        mix, mix_lens = mix.to(self.device), mix_lens.to(self.device)
        targets = torch.stack([targets[i][0] for i in range(self.hparams.num_spks)], dim=-1).to(self.device)
        hp = self.hparams
        if stage == sb.Stage.TRAIN:
            with torch.no_grad():
                if getattr(hp, "use_speedperturb", False) or getattr(hp, "use_rand_shift", False):
                    targets = self._perturb_sources(targets)
                    mix = targets.sum(-1)
                    if getattr(hp, "use_wham_noise", False) and noise is not None:
                        noise = noise.to(self.device)
                        length = min(noise.shape[1], mix.shape[1])
                        mix, targets = mix[:, :length] + noise[:, :length], targets[:, :length]
                if getattr(hp, "use_wavedrop", False):
                    mix = hp.drop_freq(hp.drop_chunk(mix, mix_lens))
                if getattr(hp, "limit_training_signal_len", False):
                    start = int(torch.randint(0, 1 + max(0, mix.shape[1] - hp.training_signal_len), (1,)))
                    mix = mix[:, start:start + hp.training_signal_len]
                    targets = targets[:, start:start + hp.training_signal_len]
        return mix, targets

    def _perturb_sources(self, targets: torch.Tensor) -> torch.Tensor:
        """Speed-perturb and/or randomly shift each source independently (then the mix is re-summed)."""
        hp = self.hparams
        sources = [targets[..., i] for i in range(targets.shape[-1])]
        if getattr(hp, "use_speedperturb", False):
            sources = [hp.speed_perturb(s) for s in sources]
        if getattr(hp, "use_rand_shift", False):
            sources = [torch.roll(s, int(torch.randint(hp.min_shift, hp.max_shift, (1,))), dims=1) for s in sources]
        length = min(s.shape[-1] for s in sources)
        return torch.stack([s[:, :length] for s in sources], dim=-1)

    def compute_forward(self, mix, targets, stage, noise=None):
        """The stock recipe's signature: returns ``(est_source, targets)``, both ``[B, T, num_spks]``."""
        mix, targets = self.prepare_signals(mix, targets, stage, noise)
        return self.separate(mix), targets

    def compute_objectives(self, predictions, targets):
        """Per-example negative PIT SI-SNR in dB, ``[B]`` (the recipe's ``loss``)."""
        return self.hparams.loss(targets, predictions)

    # -- training ----------------------------------------------------------------------------------
    def fit_batch(self, batch):
        """One optimizer step, as the stock recipe: hard loss threshold, non-finite losses skipped, clipping."""
        mixture, targets = batch.mix_sig, [batch.s1_sig, batch.s2_sig]
        if self.hparams.num_spks == 3:
            targets.append(batch.s3_sig)
        noise = batch.noise_sig[0] if getattr(self.hparams, "use_wham_noise", False) else None

        with self.training_ctx:
            predictions, targets = self.compute_forward(mixture, targets, sb.Stage.TRAIN, noise)
            loss = self.compute_objectives(predictions, targets)          # [B]
            if getattr(self.hparams, "threshold_byloss", False):    # train only on the examples not yet solved
                loss = loss[loss.detach() > self.hparams.threshold]
            loss = loss.mean() if loss.numel() else None

        usable = loss is not None and bool(torch.isfinite(loss.detach())) \
            and float(loss.detach()) < self.hparams.loss_upper_lim
        if not usable:
            self.nonfinite_count += 1
            logger.info(f"infinite loss or empty loss! it happened {self.nonfinite_count} times so far - "
                        "skipping this batch")
            if self.distributed_launch:
                # every rank must take part in DDP's gradient all-reduce: contribute a zero gradient
                loss = sum(p.sum() for p in self.modules.parameters() if p.requires_grad) * 0.0
        if usable or self.distributed_launch:
            self.scaler.scale(loss).backward()
            if self.hparams.clip_grad_norm >= 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.modules.parameters(), self.hparams.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().cpu() if usable else torch.tensor(0.0)

    def evaluate_batch(self, batch, stage):
        targets = [batch.s1_sig, batch.s2_sig]
        if self.hparams.num_spks == 3:
            targets.append(batch.s3_sig)
        with torch.no_grad():
            predictions, targets = self.compute_forward(batch.mix_sig, targets, stage)
            loss = self.compute_objectives(predictions, targets)
        if stage == sb.Stage.TEST and getattr(self.hparams, "save_audio", False):
            if getattr(self.hparams, "n_audio_to_save", 1) > 0:
                self.save_audio(batch.id[0], batch.mix_sig, targets, predictions)
                if hasattr(self.hparams, "n_audio_to_save"):
                    self.hparams.n_audio_to_save -= 1
        return loss.mean().detach()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"si-snr": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
        elif stage == sb.Stage.VALID:
            current_lr = self.optimizer.param_groups[0]["lr"]
            scheduler = getattr(self.hparams, "lr_scheduler", None)
            if isinstance(scheduler, ReduceLROnPlateau):
                current_lr, next_lr = scheduler([self.optimizer], epoch, stage_loss)
                if next_lr != current_lr and current_lr > 0:
                    for group in self.optimizer.param_groups:    # scaled: the quantizer group keeps its ratio
                        group["lr"] *= next_lr / current_lr
            self.hparams.train_logger.log_stats(stats_meta={"epoch": epoch, "lr": current_lr},
                                                train_stats=self.train_stats, valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta={"si-snr": stats["si-snr"]}, min_keys=["si-snr"])
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stats)

    # -- results -----------------------------------------------------------------------------------
    def save_results(self, test_data) -> dict:
        """``<output_folder>/test_results.csv``: SDR, SDRi, SI-SNR, SI-SNRi per utterance, then their ``avg``.

        SDR is BSS-Eval v3 (``mir_eval.separation.bss_eval_sources``), as in the stock recipe.
        Returns the averages.
        """
        from mir_eval.separation import bss_eval_sources

        path = os.path.join(self.hparams.output_folder, "test_results.csv")
        columns = ["snt_id", "sdr", "sdr_i", "si-snr", "si-snr_i"]
        loader = sb.dataio.dataloader.make_dataloader(test_data, **{**self.hparams.dataloader_opts, "batch_size": 1})
        rows = []
        self.modules.eval()
        for batch in loader:
            targets = [batch.s1_sig, batch.s2_sig] + ([batch.s3_sig] if self.hparams.num_spks == 3 else [])
            with torch.no_grad():
                predictions, targets = self.compute_forward(batch.mix_sig, targets, sb.Stage.TEST)
                mixture = torch.stack([batch.mix_sig[0]] * self.hparams.num_spks, dim=-1).to(targets.device)
                sisnr = -self.compute_objectives(predictions, targets)
                sisnr_mix = -self.compute_objectives(mixture, targets)
            reference = targets[0].t().cpu().numpy()
            sdr = _mean_sdr(bss_eval_sources, reference, predictions[0].t().cpu().numpy())
            sdr_mix = _mean_sdr(bss_eval_sources, reference, mixture[0].t().cpu().numpy())
            rows.append({"snt_id": batch.id[0], "sdr": sdr, "sdr_i": sdr - sdr_mix, "si-snr": float(sisnr[0]),
                         "si-snr_i": float(sisnr[0] - sisnr_mix[0])})
        average = {key: float(np.mean([row[key] for row in rows])) for key in columns[1:]}
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
            writer.writerow({"snt_id": "avg", **average})
        for name, key in (("SISNR", "si-snr"), ("SISNRi", "si-snr_i"), ("SDR", "sdr"), ("SDRi", "sdr_i")):
            logger.info(f"Mean {name} is {average[key]}")
        return average

    def save_audio(self, snt_id, mixture, targets, predictions) -> None:
        """Peak-normalised wavs of the estimates, references and mixture in ``<save_folder>/audio_results``."""
        from speechbrain.dataio import audio_io

        folder = Path(self.hparams.save_folder) / "audio_results"
        folder.mkdir(parents=True, exist_ok=True)

        def write(name: str, signal: torch.Tensor) -> None:
            signal = signal / signal.abs().max().clamp(min=1e-8)
            audio_io.save(str(folder / name), signal.unsqueeze(0).cpu(), self.hparams.sample_rate)

        for source in range(self.hparams.num_spks):
            write(f"item{snt_id}_source{source + 1}hat.wav", predictions[0, :, source])
            write(f"item{snt_id}_source{source + 1}.wav", targets[0, :, source])
        write(f"item{snt_id}_mix.wav", mixture[0][0])



def _mean_sdr(bss_eval_sources, reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean BSS-Eval SDR over sources; NaN (with a warning) when an estimate is silent."""
    try:
        with warnings.catch_warnings():          # mir_eval 0.8 deprecates bss_eval_sources (the recipe's SDR)
            warnings.simplefilter("ignore", FutureWarning)
            sdr, _, _, _ = bss_eval_sources(reference, estimate)
    except ValueError as error:      # mir_eval refuses all-zero estimates
        logger.warning(f"SDR not computed: {error}")
        return float("nan")
    return float(np.mean(sdr))


def prepare_librimix(datapath, savepath, n_spks=2, skip_prep=False, fs=8000):
    """SpeechBrain's ``prepare_librimix`` (``libri2mix_<split>.csv`` manifests in ``savepath``)."""
    if skip_prep:
        return
    if n_spks != 2:
        raise RecipeError(f"num_spks: this recipe prepares Libri2Mix only, got num_spks={n_spks}")
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
        raise RecipeError(f"{hparams['train_data']}: no training mixture")
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
        raise RecipeError(f"precision: {precision}: fqss QAT runs in fp32 only (set `precision: fp32` or pass "
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
        try:
            hparams["pretrained_separator"].load_collected()
        except ValueError as error:                     # fqss' transfer hook names the file that does not fit
            raise RecipeError(str(error)) from None

    separator = Separation(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams,
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
    sys.exit(run_recipe(main))
