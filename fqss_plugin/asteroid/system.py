"""Asteroid training glue: the ``System`` of FQSS quantization-aware training."""
from __future__ import annotations

import torch
from asteroid.engine.system import System
from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr
from torch import nn

from ..loss import FQSSLoss
from ..quant import calibration_step
from ..quant.optim import extend_plateau_scheduler, regroup_quantizer_parameters


class FQSSSystem(System):
    """Asteroid ``System`` for quantization-aware training with distillation from a float teacher.

    Training minimises ``loss_func`` if it is an :class:`~fqss_plugin.FQSSLoss` (the teacher's estimate
    feeds its distillation term), :meth:`FQSSLoss.fqss() <fqss_plugin.FQSSLoss.fqss>` if a ``teacher`` is
    given with another loss (a recipe's ``PITLossWrapper``), and ``loss_func`` otherwise; validation
    reports the usual PIT negative SI-SDR in dB as ``val_loss``. An optimizer built over
    ``model.parameters()`` gets the quantizers' ranges as a group of their own at the config's
    ``quantizer_lr`` (:func:`~fqss_plugin.quant.optim.regroup_quantizer_parameters`). The teacher is held outside the registered submodules, so it is neither
    optimised, nor checkpointed, nor switched to train mode by Lightning; it is moved to the
    device when fitting starts. After every optimizer step, :func:`calibration_step` counts the
    step for the calibrating quantizers (and averages their ranges over DDP ranks).
    """

    def __init__(self, model, optimizer, loss_func, train_loader, val_loader=None, scheduler=None, config=None,
                 teacher: nn.Module | None = None) -> None:
        super().__init__(model, optimizer, loss_func, train_loader, val_loader, scheduler, config)
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self.validation_loss = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
        if teacher is not None and not isinstance(loss_func, FQSSLoss):
            self.loss_func = FQSSLoss.fqss()

    def configure_optimizers(self):
        config = getattr(self.model, "fqss_config", None)
        if config is not None and regroup_quantizer_parameters(self.optimizer, self.model, config.quantizer_lr):
            for scheduler in self.scheduler if isinstance(self.scheduler, (list, tuple)) else [self.scheduler]:
                extend_plateau_scheduler(scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler,
                                         self.optimizer)
        return super().configure_optimizers()

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def common_step(self, batch, batch_nb, train=True):
        inputs, targets = batch[0], batch[1]
        estimate = self(inputs)
        if not train:
            return self.validation_loss(estimate, targets)
        if not isinstance(self.loss_func, FQSSLoss):
            return self.loss_func(estimate, targets)
        teacher_estimate = None
        if self.loss_func.lambda_kd > 0:
            if self.teacher is None:
                raise ValueError("FQSSSystem: the loss has lambda_kd > 0 but no teacher was given")
            with torch.no_grad():
                teacher_estimate = self.teacher(inputs)
        loss = self.loss_func(estimate, targets, teacher_estimate)
        if self.loss_func.distillation_share is not None:
            self.log("kd_share", self.loss_func.distillation_share, on_epoch=True, on_step=False)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        calibration_step(self.model)
