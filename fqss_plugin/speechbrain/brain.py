"""SpeechBrain training glue: what a separation ``Brain`` needs for FQSS quantization-aware training.

A recipe keeps its own ``Brain`` (``compute_forward``, ``compute_objectives``, ``fit_batch``, ...) and
decorates it::

    from fqss_plugin.speechbrain import fqss_brain

    @fqss_brain
    class Separation(sb.Brain):
        ...                                   # the recipe's code, unchanged

:func:`fqss_brain` returns a subclass with :class:`FQSSBrainMixin` in front, which wraps the recipe's
methods through ``super()``:

* ``compute_forward`` records the mixture the encoder receives (after the recipe's augmentations);
* ``compute_objectives``, while training, returns the per-example :class:`~fqss_plugin.FQSSLoss`
  (``average="db"``) with the float teacher's estimate of that mixture in the distillation term, so
  the recipe's own loss thresholding and averaging apply to it; in evaluation, the recipe's loss;
* ``fit_batch`` ends with :func:`~fqss_plugin.calibration_step` (every batch, on every rank);
* ``init_optimizers`` gives the quantizers' ranges their own learning rate
  (:func:`~fqss_plugin.quant.parameter_groups`), and ``on_stage_end`` keeps that ratio when the
  recipe's ``ReduceLROnPlateau`` sets one rate for every group;
* ``on_fit_start`` gives the teacher the student's float weights (the pretrained ones) before a
  checkpoint is recovered; ``reset_layer_recursively`` also resets the quantizers;
* a quantized run refuses fp16/bf16 autocast (the quantizers would put rounded values on their grids).

The hparams provide ``float_teacher`` (the return value of :func:`~fqss_plugin.speechbrain.quantize_inplace`;
with it the objective is ``fqss_loss``, by default :meth:`FQSSLoss.fqss() <fqss_plugin.FQSSLoss.fqss>`) or
a ``fqss_loss`` with ``lambda_kd = 0`` (vanilla QAT). Without either, the Brain trains as it is.
The train log's ``si-snr`` stays the student's own negative SI-SNR; QAT runs also log ``fqss-loss``.
"""
from __future__ import annotations

import logging

import speechbrain as sb
import torch
from speechbrain.utils.distributed import ddp_broadcast
from torch import nn

from ..loss import FQSSLoss
from ..quant import QuantConfig, calibration_step, parameter_groups
from ..quant.state import STATEFUL_TYPES, is_quantized, reset_quantizers
from .hparams import MODULE_KEYS
from .package import separate_sources

logger = logging.getLogger(__name__)


def _unwrapped(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)          # DDP -> the module


class FQSSBrainMixin:
    """FQSS quantization-aware training for a SpeechBrain separation ``Brain`` (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher: nn.ModuleDict | None = getattr(self.hparams, "float_teacher", None)
        self.fqss_loss: FQSSLoss | None = getattr(self.hparams, "fqss_loss", None)
        if self.fqss_loss is None and self.teacher is not None:
            self.fqss_loss = FQSSLoss.fqss()
        if self.fqss_loss is not None and not isinstance(self.fqss_loss, FQSSLoss):
            raise TypeError(f"hparams fqss_loss must be a fqss_plugin.FQSSLoss, got {type(self.fqss_loss).__name__}")
        if self.distills and self.teacher is None:
            raise ValueError("hparams: fqss_loss has lambda_kd > 0 but there is no float_teacher (the return value "
                             "of fqss_plugin.speechbrain.quantize_inplace)")
        if self.quantized and self.precision != "fp32":
            raise ValueError(f"precision: {self.precision}: fqss QAT runs in fp32 only (set `precision: fp32` or "
                             "pass --precision fp32)")
        self._teacher_ready = False
        self._fqss_mix: torch.Tensor | None = None
        self._fqss_sums = [0.0, 0.0, 0]           # objective, student negative SI-SNR, batches
        if not hasattr(self, "nonfinite_count"):
            self.nonfinite_count = 0

    @property
    def distills(self) -> bool:
        return self.fqss_loss is not None and self.fqss_loss.lambda_kd > 0

    @property
    def quantized(self) -> bool:
        return any(is_quantized(m) for m in self.modules.values())

    @property
    def quant_config(self) -> QuantConfig | None:
        """``hparams.fqss``, or the config :func:`quantize_inplace` quantized the modules with."""
        config = getattr(self.hparams, "fqss", None)
        return config or next((getattr(_unwrapped(m), "fqss_config", None) for m in self.modules.values()
                               if getattr(_unwrapped(m), "fqss_config", None) is not None), None)

    # -- set-up ------------------------------------------------------------------------------------
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
            missing, _ = teacher_module.load_state_dict(_unwrapped(self.modules[key]).state_dict(), strict=False)
            if missing:
                raise RuntimeError(f"float_teacher[{key!r}] does not match modules[{key!r}] (missing {missing[:3]})")
        self.teacher.to(self.device).eval().requires_grad_(False)
        self._teacher_ready = True
        if "pretrained_separator" not in vars(self.hparams):
            logger.warning("fqss: no pretrained_separator in the hparams: the float teacher has the student's "
                           "initial (untrained) weights")

    def init_optimizers(self):
        """The recipe's optimizer, over :func:`~fqss_plugin.quant.parameter_groups` when the modules are
        quantized: the quantizers' ranges learn at ``quantizer_lr``, the weights at the yaml's ``lr``."""
        config = self.quant_config
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
        """Re-initialise the float parameters (as a recipe does without a pretrained model), then put
        the quantizers back to their never-seen-data state."""
        for module in layer.modules():
            if not isinstance(module, STATEFUL_TYPES) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        reset_quantizers(layer)

    # -- the wrapped recipe methods ------------------------------------------------------------------
    def compute_forward(self, *args, **kwargs):
        if not (self.distills and self.modules.training):
            return super().compute_forward(*args, **kwargs)

        def record(_module, inputs):
            self._fqss_mix = inputs[0].detach()

        handle = _unwrapped(self.modules["encoder"]).register_forward_pre_hook(record)
        try:
            return super().compute_forward(*args, **kwargs)
        finally:
            handle.remove()

    def compute_objectives(self, predictions, targets, *args, **kwargs):
        """Training: the per-example FQSS loss of ``predictions`` (``[B, T, n_src]``) against ``targets``, ``[B]``;
        otherwise the recipe's own objective."""
        if self.fqss_loss is None or not self.modules.training or not torch.is_grad_enabled():
            return super().compute_objectives(predictions, targets, *args, **kwargs)
        teacher_estimate = None
        if self.distills:
            if self._fqss_mix is None:
                raise RuntimeError("fqss: the encoder did not run in compute_forward: no mixture for the teacher")
            with torch.no_grad():
                teacher = self.teacher
                teacher_estimate = separate_sources(self._fqss_mix, teacher["encoder"], teacher["masknet"],
                                                    teacher["decoder"], predictions.shape[-1])
            teacher_estimate = teacher_estimate[:, :predictions.shape[1]].transpose(1, 2)
            self._fqss_mix = None
        losses = self.fqss_loss.per_example(predictions.transpose(1, 2), targets.transpose(1, 2), teacher_estimate)
        if torch.isfinite(losses).all():
            sums = self._fqss_sums
            sums[0] += float(losses.detach().mean())
            sums[1] += float(-self.fqss_loss.student_db.mean())
            sums[2] += 1
        return losses

    def fit_batch(self, batch):
        loss = super().fit_batch(batch)
        if self.quantized:
            calibration_step(self.modules)     # every rank, every batch: the range all-reduce stays in step
        return loss

    def on_stage_start(self, stage, epoch=None):
        if stage == sb.Stage.TRAIN:
            self._fqss_sums = [0.0, 0.0, 0]
        return super().on_stage_start(stage, epoch)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN and self._fqss_sums[2]:
            objective, student, count = self._fqss_sums
            super().on_stage_end(stage, student / count, epoch)
            if isinstance(getattr(self, "train_stats", None), dict):
                self.train_stats["fqss-loss"] = objective / count
            return None
        lrs = [group["lr"] for group in self.optimizer.param_groups] if stage == sb.Stage.VALID and \
            getattr(self, "optimizer", None) is not None else []
        result = super().on_stage_end(stage, stage_loss, epoch)
        if lrs and lrs[0] > 0:
            first = self.optimizer.param_groups[0]["lr"]
            if first != lrs[0]:                  # a scheduler moved the rates: the quantizer group keeps its ratio
                for group, before in zip(self.optimizer.param_groups[1:], lrs[1:]):
                    group["lr"] = first * before / lrs[0]
        return result


def fqss_brain(brain_class: type) -> type:
    """``brain_class`` with :class:`FQSSBrainMixin` in front (a subclass of the same name)."""
    if issubclass(brain_class, FQSSBrainMixin):
        return brain_class
    return type(brain_class.__name__, (FQSSBrainMixin, brain_class),
                {"__module__": brain_class.__module__, "__qualname__": brain_class.__qualname__,
                 "__doc__": brain_class.__doc__})


__all__ = ["FQSSBrainMixin", "MODULE_KEYS", "fqss_brain"]
