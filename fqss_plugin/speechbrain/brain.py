"""SpeechBrain training glue: the separation ``Brain`` of FQSS quantization-aware training."""
from __future__ import annotations

import csv
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import speechbrain as sb
import torch
from speechbrain.nnet.schedulers import ReduceLROnPlateau
from speechbrain.utils.distributed import ddp_broadcast
from torch import nn

from ..loss import FQSSLoss
from ..quant import calibration_step, parameter_groups
from ..quant.state import STATEFUL_TYPES, is_quantized, reset_quantizers
from .package import separate_sources

logger = logging.getLogger(__name__)


class FQSSSeparation(sb.Brain):
    """The LibriMix/WSJ0Mix separation Brain, for float training and for (FQSS) quantization-aware training.

    It follows the stock recipe's ``Separation`` (same batch keys, augmentations, per-example loss
    thresholding, skipping of non-finite losses, gradient clipping, ``ReduceLROnPlateau``, logging,
    checkpoints and ``test_results.csv``) and differs where quantization needs it:

    * it calls ``self.modules.encoder/masknet/decoder`` (not the hparams aliases), so DDP applies;
    * ``mix_w * est_mask`` is quantized by the decoder's input quantizer (:class:`QSBDecoder`), the
      input and output signals by the encoder's input splitter and the decoder's output combiner;
    * with ``fqss_loss`` in the hparams, the training objective is :class:`~fqss_plugin.FQSSLoss`
      on the examples kept by the stock threshold (the student's own SI-SNR decides, as upstream),
      with the estimate of ``float_teacher`` (hparams only: not DDP-wrapped, not optimised, not
      checkpointed) for the distillation term;
    * after every optimizer step, :func:`~fqss_plugin.calibration_step` (all ranks, in step);
    * when fitting starts, the teacher takes the student's float weights (the pretrained ones, as
      ``train.py`` loads them before building the Brain) *before* a checkpoint is recovered.

    The train log's ``si-snr`` is the negative SI-SNR of the student in every mode (comparable
    across float, vanilla and FQSS); QAT runs also log ``fqss-loss``, the objective minimised.
    """

    # -- set-up ------------------------------------------------------------------------------------
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fqss_loss: FQSSLoss | None = getattr(self.hparams, "fqss_loss", None)
        self.teacher: nn.ModuleDict | None = getattr(self.hparams, "float_teacher", None)
        if self.fqss_loss is not None and not isinstance(self.fqss_loss, FQSSLoss):
            raise TypeError(f"hparams fqss_loss must be a fqss_plugin.FQSSLoss, got {type(self.fqss_loss).__name__}")
        if self.distills and self.teacher is None:
            raise ValueError("hparams: fqss_loss has lambda_kd > 0 but there is no float_teacher (the return value "
                             "of fqss_plugin.speechbrain.quantize_inplace)")
        self._teacher_ready = False
        self.nonfinite_count = 0

    @property
    def distills(self) -> bool:
        return self.fqss_loss is not None and self.fqss_loss.lambda_kd > 0

    @property
    def quantized(self) -> bool:
        return any(is_quantized(m) for m in self.modules.values())

    def on_fit_start(self):
        if self.teacher is not None and not self._teacher_ready:
            self._load_teacher()
        if self.distributed_launch and self.checkpointer is not None and self.debug:
            # --debug gives every rank its own temporary checkpoint folder; the checkpointer's
            # collectives (deleting old checkpoints) then deadlock. All ranks use rank 0's.
            self.checkpointer.checkpoints_dir = ddp_broadcast(self.checkpointer.checkpoints_dir, src=0)
        super().on_fit_start()          # DDP wrapping, optimizer, then checkpoint recovery

    @torch.no_grad()
    def _load_teacher(self) -> None:
        """The teacher takes the student's float weights (quantizer state aside)."""
        for key, teacher_module in self.teacher.items():
            student = self.modules[key]
            student = getattr(student, "module", student)
            missing, _ = teacher_module.load_state_dict(student.state_dict(), strict=False)
            if missing:
                raise RuntimeError(f"float_teacher[{key!r}] does not match modules[{key!r}] (missing {missing[:3]})")
        self.teacher.to(self.device).eval().requires_grad_(False)
        self._teacher_ready = True
        if "pretrained_separator" not in vars(self.hparams):
            logger.warning("fqss: no pretrained_separator in the hparams: the float teacher has the student's "
                           "initial (untrained) weights")

    def init_optimizers(self):
        """The stock optimizer, over :func:`~fqss_plugin.quant.parameter_groups` when the modules are
        quantized: the quantizers' ranges learn at ``fqss.quantizer_lr``, the weights at the yaml's ``lr``."""
        config = getattr(self.hparams, "fqss", None)
        if self.opt_class is None or config is None or not self.quantized:
            return super().init_optimizers()
        if self.remove_vector_weight_decay:
            raise ValueError("--remove_vector_weight_decay: not supported with quantized modules (the quantizers' "
                             "ranges already get no weight decay)")
        self.optimizer = self.opt_class(parameter_groups(self.modules, config.quantizer_lr))
        self.optimizers_dict = {"opt_class": self.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    def reset_layer_recursively(self, layer: nn.Module) -> None:
        """Re-initialise the float parameters (as the stock recipe does without a pretrained model),
        then put the quantizers back to their never-seen-data state."""
        for module in layer.modules():
            if not isinstance(module, STATEFUL_TYPES) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        reset_quantizers(layer)

    # -- forward -----------------------------------------------------------------------------------
    def separate(self, mix: torch.Tensor, modules=None) -> torch.Tensor:
        """``[B, T]`` mixture -> ``[B, T, num_spks]`` estimates with ``modules`` (default: ``self.modules``)."""
        modules = self.modules if modules is None else modules
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
        mixture, targets = batch.mix_sig, [batch.s1_sig, batch.s2_sig]
        if self.hparams.num_spks == 3:
            targets.append(batch.s3_sig)
        noise = batch.noise_sig[0] if getattr(self.hparams, "use_wham_noise", False) else None

        with self.training_ctx:
            mix, targets = self.prepare_signals(mixture, targets, sb.Stage.TRAIN, noise)
            predictions = self.separate(mix)
            neg_sisnr = self.compute_objectives(predictions, targets)          # [B], dB
            keep = self._kept(neg_sisnr)
            if self.fqss_loss is None:
                loss = neg_sisnr[keep].mean() if keep.any() else neg_sisnr.new_zeros(())
            elif keep.any():
                teacher_estimate = None
                if self.distills:
                    with torch.no_grad():
                        teacher_estimate = self.separate(mix, self.teacher)[keep].transpose(1, 2)
                loss = self.fqss_loss(predictions[keep].transpose(1, 2), targets[keep].transpose(1, 2),
                                      teacher_estimate)
            else:
                loss = neg_sisnr.new_zeros(())

        usable = bool(keep.any()) and bool(torch.isfinite(loss.detach())) \
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
        if self.quantized:
            calibration_step(self.modules)     # every rank, every batch: the range all-reduce stays in step
        if self.fqss_loss is not None and usable:
            self._fqss_loss_sum += float(loss.detach())
            self._fqss_loss_count += 1
        kept = neg_sisnr.detach()[keep]
        return kept.mean().cpu() if kept.numel() and torch.isfinite(kept).all() else torch.tensor(0.0)

    def _kept(self, neg_sisnr: torch.Tensor) -> torch.Tensor:
        """The stock recipe's hard threshold: train only on examples whose loss is above ``threshold``."""
        if getattr(self.hparams, "threshold_byloss", False):
            return neg_sisnr.detach() > self.hparams.threshold
        return torch.ones_like(neg_sisnr, dtype=torch.bool)

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

    def on_stage_start(self, stage, epoch=None):
        if stage == sb.Stage.TRAIN:
            self._fqss_loss_sum, self._fqss_loss_count = 0.0, 0

    def on_stage_end(self, stage, stage_loss, epoch=None):
        stats = {"si-snr": stage_loss}
        if stage == sb.Stage.TRAIN:
            if self.fqss_loss is not None and self._fqss_loss_count:
                stats["fqss-loss"] = self._fqss_loss_sum / self._fqss_loss_count
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
