"""The FQSS training objective: task loss plus sample-weighted distillation from the float model.

Speech (``task="sisdr"``), with linear-domain SI-SDR ``S(a, r) = ||αr||² / ||a - αr||²`` (zero mean,
``α = <a, r>/||r||²``; torchmetrics' SI-SDR), permutation-solved with torchmetrics'
``permutation_invariant_training``::

    T_b = max_π mean_n S(ŝ_q[π(n)], s[n])           (student vs ground truth)
    K_b = max_π mean_n S(ŝ_q[π(n)], ŝ_f[n])         (student vs float teacher)
    L   = -10 log10((1-λ) mean_b T_b + λ mean_b w_b K_b)                 (average="linear", the paper's)

or, with ``average="db"``, the log taken per example and source and the mean in dB, like the metric
(and like SpeechBrain's per-item variant of the published code)::

    L   = mean_b mean_n -10 log10((1-λ) S(ŝ_q[π_b(n)], s[n]) + λ w_b S(ŝ_q[π_b(n)], ŝ_f[ρ_b(n)]))

(``π_b``, ``ρ_b``: the student's and the teacher's PIT alignments to the ground truth); at ``λ = 0``
it is the PIT negative SI-SDR of float training (Asteroid's ``PITLossWrapper(pairwise_neg_sisdr)``).
The linear average weighs the best-separated examples and sources most: a mixture at 20 dB counts 10x one at 10 dB.

Music (``task="l1"``, fixed stem order): ``L = (1-λ) mean_b L1(ŝ_q, s) + λ mean_b w_b L1(ŝ_q, ŝ_f)``.

Sample weights (no gradient): ``w_b = 10^((D_f,b - D_q,b)/10)`` where ``D`` is the PIT SI-SDR (speech)
or the MDX nSDR (music) in dB of the teacher (``f``) and the student (``q``) against the ground
truth. ``w_b > 1`` exactly where the quantized model is *worse* than the float one: the
quantization-sensitive samples weigh more. Weights are clipped to ``weight_range`` and normalised
to mean 1 over the batch, so any batch size works. ``lambda_kd=0`` is vanilla QAT (no teacher).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

EPS = 1e-8


def sisdr_db(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SI-SDR in dB over the last axis (zero-mean), ``[..., T] -> [...]``: torchmetrics'
    ``scale_invariant_signal_distortion_ratio``."""
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio
    return scale_invariant_signal_distortion_ratio(estimate, reference, zero_mean=True)


def _pit(estimate: torch.Tensor, reference: torch.Tensor, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics' ``permutation_invariant_training``: per example ``max_π mean_n metric(ŝ[π(n)], s[n])``
    and the best permutation ``π``."""
    from torchmetrics.functional.audio import permutation_invariant_training
    return permutation_invariant_training(estimate, reference, metric, eval_func="max")


def pit_sisdr_db(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-example permutation-invariant SI-SDR in dB, ``[B, n_src, T] -> [B]``."""
    return _pit(estimate, reference, sisdr_db)[0]


def pit_sisdr_linear(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-example ``max_π mean_n`` linear SI-SDR, ``[B, n_src, T] -> [B]``."""
    return _pit(estimate, reference, lambda e, r: torch.pow(10.0, sisdr_db(e, r) / 10.0))[0]


def pit_aligned(estimate: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``estimate`` reordered by its PIT (mean dB SI-SDR) alignment to ``reference``, and that PIT
    SI-SDR in dB per example (``[B]``, as :func:`pit_sisdr_db`), from one pairwise matrix."""
    from torchmetrics.functional.audio import pit_permutate
    best, perm = _pit(estimate, reference, sisdr_db)
    return pit_permutate(estimate, perm), best


def nsdr_db(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """MDX nSDR ``10 log10(Σ s² / Σ (s - ŝ)²)`` per example over all sources, channels and samples."""
    dims = tuple(range(1, reference.dim()))
    num = reference.pow(2).sum(dims) + EPS
    den = (reference - estimate).pow(2).sum(dims) + EPS
    return 10 * torch.log10(num / den)


def l1_per_example(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (estimate - reference).abs().flatten(1).mean(1)


class FQSSLoss(nn.Module):
    """FQSS loss (see module docstring). Call as ``loss(estimate, target, teacher_estimate)``.

    The defaults are the paper's; the recipes use the presets :meth:`fqss` and :meth:`vanilla`.

    Args:
        lambda_kd: weight λ of the distillation term; 0 gives vanilla QAT and needs no teacher.
        task: ``"sisdr"`` (speech, permutation invariant) or ``"l1"`` (music, fixed order).
        weight_range: clip range of the sample weights before normalisation to mean 1.
        average: speech only: ``"linear"`` (the paper's: batch mean of linear SI-SDRs inside one log)
            or ``"db"`` (log per example and source, mean in dB: the metric's average).
    """

    def __init__(self, lambda_kd: float = 0.1, task: Literal["sisdr", "l1"] = "sisdr",
                 weight_range: tuple[float, float] = (0.1, 10.0), average: Literal["linear", "db"] = "linear") -> None:
        super().__init__()
        if average not in ("linear", "db"):
            raise ValueError(f"FQSSLoss: average must be 'linear' or 'db', got {average!r}")
        self.average = average
        if not 0.0 <= lambda_kd <= 1.0:
            raise ValueError(f"FQSSLoss: lambda_kd must be in [0, 1], got {lambda_kd}")
        if task not in ("sisdr", "l1"):
            raise ValueError(f"FQSSLoss: task must be 'sisdr' or 'l1', got {task!r}")
        if not 0 < weight_range[0] <= 1.0 <= weight_range[1]:
            raise ValueError(f"FQSSLoss: weight_range must satisfy 0 < low <= 1 <= high, got {weight_range}")
        self.lambda_kd = lambda_kd
        self.task = task
        self.weight_range = weight_range
        self.student_db: torch.Tensor | None = None
        """Speech, ``average="db"``: the student's PIT SI-SDR in dB per example at the last call."""
        self.distillation_share: float | None = None
        """Speech: the distillation term's share of the last call's linear sum, ``λ·mean(w K) / (…)``,
        which is also its share of the gradient in dB. With the student ~25 dB from the teacher and
        ~10 dB from the truth, ``λ = 0.1`` gives the distillation about 80 %."""

    @classmethod
    def fqss(cls, **overrides) -> FQSSLoss:
        """The recipes' FQSS objective (with :meth:`QuantConfig.fqss <fqss_plugin.QuantConfig.fqss>`): λ = 0.01,
        the dB average. The class defaults are the paper's (λ = 0.1, linear average)."""
        return cls(**{"lambda_kd": 0.01, "average": "db", **overrides})

    @classmethod
    def vanilla(cls, **overrides) -> FQSSLoss:
        """The recipes' vanilla-QAT objective: no distillation, the dB average (the float training loss)."""
        return cls(**{"lambda_kd": 0.0, "average": "db", **overrides})

    @torch.no_grad()
    def sample_weights(self, estimate: torch.Tensor, target: torch.Tensor,
                       teacher_estimate: torch.Tensor) -> torch.Tensor:
        """``w_b = 10^((D_teacher,b - D_student,b)/10)``, clipped, normalised to mean 1."""
        quality = pit_sisdr_db if self.task == "sisdr" else nsdr_db
        return self.weights_from_gap(quality(teacher_estimate, target) - quality(estimate, target))

    @torch.no_grad()
    def weights_from_gap(self, gap_db: torch.Tensor) -> torch.Tensor:
        """``10^(gap/10)`` per example, clipped to ``weight_range``, normalised to mean 1."""
        weights = torch.pow(10.0, gap_db / 10.0).clamp(*self.weight_range)
        return weights / weights.mean()

    def _checked_teacher(self, estimate: torch.Tensor, target: torch.Tensor,
                         teacher_estimate: torch.Tensor | None) -> torch.Tensor | None:
        if estimate.shape != target.shape:
            raise ValueError(f"FQSSLoss: estimate shape {tuple(estimate.shape)} != target shape {tuple(target.shape)}")
        if self.lambda_kd == 0:
            return None
        if teacher_estimate is None:
            raise ValueError("FQSSLoss: lambda_kd > 0 needs teacher_estimate (the float model's output)")
        if teacher_estimate.shape != estimate.shape:
            raise ValueError(f"FQSSLoss: teacher_estimate shape {tuple(teacher_estimate.shape)} != "
                             f"estimate shape {tuple(estimate.shape)}")
        return teacher_estimate.detach()

    def per_example(self, estimate: torch.Tensor, target: torch.Tensor,
                    teacher_estimate: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of each example, ``[B]`` (``average="db"``, speech: the mean over its sources); ``forward``
        is their mean. Also sets :attr:`student_db`, the student's PIT SI-SDR in dB per example."""
        if self.task != "sisdr" or self.average != "db":
            raise ValueError("FQSSLoss.per_example: only with task='sisdr' and average='db' (the linear average "
                             "and the L1 loss are batch quantities)")
        return self._per_source_db(estimate, target, self._checked_teacher(estimate, target, teacher_estimate)).mean(1)

    def forward(self, estimate: torch.Tensor, target: torch.Tensor,
                teacher_estimate: torch.Tensor | None = None) -> torch.Tensor:
        teacher_estimate = self._checked_teacher(estimate, target, teacher_estimate)
        distill = teacher_estimate is not None
        lam = self.lambda_kd
        if self.task == "sisdr" and self.average == "db":
            return self._per_source_db(estimate, target, teacher_estimate).mean()
        if self.task == "sisdr":
            task = (1 - lam) * pit_sisdr_linear(estimate, target).mean()
            value = task
            if distill:
                weights = self.sample_weights(estimate, target, teacher_estimate)
                value = value + lam * (weights * pit_sisdr_linear(estimate, teacher_estimate)).mean()
            self.distillation_share = float(1 - task.detach() / value.detach())
            return -10 * torch.log10(value + EPS)
        loss = (1 - lam) * l1_per_example(estimate, target).mean()
        if distill:
            weights = self.sample_weights(estimate, target, teacher_estimate)
            loss = loss + lam * (weights * l1_per_example(estimate, teacher_estimate)).mean()
        return loss

    def _per_source_db(self, estimate: torch.Tensor, target: torch.Tensor,
                       teacher_estimate: torch.Tensor | None) -> torch.Tensor:
        """``average="db"``: the loss of each example and source, ``[B, n_src]`` (the mean over both is the
        loss). The PIT alignments also give the dB gaps of the sample weights (no third pairwise matrix)."""
        aligned, student_db = pit_aligned(estimate, target)
        self.student_db = student_db.detach()
        task_db = sisdr_db(aligned, target)
        if teacher_estimate is None:
            self.distillation_share = 0.0
            return -task_db
        lam = self.lambda_kd
        teacher_aligned, teacher_db = pit_aligned(teacher_estimate, target)
        weights = self.weights_from_gap(teacher_db - student_db)[:, None]
        kd_db = sisdr_db(aligned, teacher_aligned)
        task = (1 - lam) * torch.pow(10.0, task_db / 10)
        distill = lam * weights * torch.pow(10.0, kd_db / 10)
        self.distillation_share = float((distill / (task + distill)).detach().mean())
        return -10 * torch.log10(task + distill + EPS)
