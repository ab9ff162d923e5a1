"""FQSSLoss: sample weights, PIT, batch sizes, vanilla case, L1 variant."""
import math

import pytest
import torch

from fqss_plugin import FQSSLoss
from fqss_plugin.loss import pit_sisdr_db
from tests.conftest import speech_like


def sources(batch=3, length=4000):
    s = speech_like(batch=2 * batch, length=length)
    return s.view(batch, 2, length)


def noisy(x, level):
    return x + level * torch.randn_like(x)


def test_weights_favour_samples_where_the_student_is_worse_than_the_teacher():
    target = sources()
    teacher = noisy(target, 0.01)
    student = teacher.clone()
    student[1] = noisy(target[1], 0.3)            # sample 1: quantization hurt it badly
    weights = FQSSLoss(0.1).sample_weights(student, target, teacher)
    assert weights.shape == (3,)
    assert torch.isclose(weights.mean(), torch.tensor(1.0))
    assert weights[1] > 1 and weights[1] > 5 * weights[0] and weights[1] > 5 * weights[2]


def test_weights_are_clipped_before_normalisation():
    target = sources()
    teacher = target.clone()
    student = noisy(target, 0.0)
    student[0] = noisy(target[0], 10.0)           # ~ -40 dB worse: raw weight 1e4
    weights = FQSSLoss(0.1, weight_range=(0.5, 4.0)).sample_weights(student, target, teacher)
    assert weights.max() / weights.min() <= 4.0 / 0.5 + 1e-4


def test_loss_is_permutation_invariant_and_works_for_any_batch_size():
    loss = FQSSLoss(0.1)
    for batch in (1, 2, 5):
        target = sources(batch)
        teacher = noisy(target, 0.05)
        student = noisy(target, 0.1)
        value = loss(student, target, teacher)
        swapped = loss(student.flip(1), target, teacher.flip(1))
        assert value.shape == () and torch.isfinite(value)
        assert torch.allclose(value, swapped, atol=1e-5)


def test_loss_decreases_as_the_student_improves_and_has_gradients():
    loss = FQSSLoss(0.1)
    target = sources()
    teacher = noisy(target, 0.05)
    values = [loss(noisy(target, level), target, teacher).item() for level in (0.5, 0.1, 0.02)]
    assert values[0] > values[1] > values[2]
    student = noisy(target, 0.1).requires_grad_()
    loss(student, target, teacher).backward()
    assert student.grad.abs().sum() > 0


def test_vanilla_case_needs_no_teacher_and_is_the_task_si_sdr():
    target = sources()
    student = noisy(target, 0.1)
    value = FQSSLoss(lambda_kd=0.0)(student, target)
    est = student - student.mean(-1, keepdim=True)             # identity is the best permutation here
    ref = target - target.mean(-1, keepdim=True)
    projection = (est * ref).sum(-1, keepdim=True) / ref.pow(2).sum(-1, keepdim=True) * ref
    linear = projection.pow(2).sum(-1) / (est - projection).pow(2).sum(-1)     # [batch, sources]
    assert torch.allclose(value, -10 * torch.log10(linear.mean()), atol=1e-3)
    assert (pit_sisdr_db(student, target) > 0).all()
    with pytest.raises(ValueError, match="teacher_estimate"):
        FQSSLoss(lambda_kd=0.1)(student, target)


def test_distillation_pulls_towards_the_teacher():
    target = sources()
    teacher = noisy(target, 0.2)                 # a teacher that is not the ground truth
    near_teacher = teacher + 0.01 * torch.randn_like(teacher)
    assert FQSSLoss(0.9)(near_teacher, target, teacher) < FQSSLoss(0.0)(near_teacher, target)


def test_l1_task_for_music_weights_by_nsdr():
    target = torch.randn(3, 4, 2, 1000)            # batch, stems, channels, samples
    teacher = target + 0.01 * torch.randn_like(target)
    student = teacher.clone()
    student[2] += 0.5 * torch.randn_like(student[2])
    loss = FQSSLoss(0.1, task="l1")
    weights = loss.sample_weights(student, target, teacher)
    assert weights[2] > 1 and weights.argmax() == 2
    assert torch.isfinite(loss(student, target, teacher))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lambda_kd"):
        FQSSLoss(1.5)
    with pytest.raises(ValueError, match="task"):
        FQSSLoss(task="mse")
    with pytest.raises(ValueError, match="shape"):
        FQSSLoss(0.0)(torch.zeros(2, 2, 10), torch.zeros(2, 3, 10))


def test_silence_gives_a_finite_loss():
    zeros = torch.zeros(2, 2, 1000)
    assert torch.isfinite(FQSSLoss(0.1)(zeros, sources(2, 1000), zeros))


def test_distillation_share_of_the_linear_sum():
    """λ = 0.1 is not 10 % of the objective: K (student vs teacher) is much larger than T in the linear domain."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(4, 2, 8000, generator=gen)
    teacher = target + 10 ** (-10 / 20) * torch.randn(4, 2, 8000, generator=gen)     # ~10 dB from the truth
    student = teacher + 10 ** (-25 / 20) * torch.randn(4, 2, 8000, generator=gen)    # ~25 dB from the teacher
    loss = FQSSLoss(lambda_kd=0.1)
    loss(student, target, teacher)
    t, k = 10 ** (10 / 10), 10 ** (25 / 10)
    assert loss.distillation_share == pytest.approx(0.1 * k / (0.9 * t + 0.1 * k), abs=0.03)     # about 0.78
    vanilla = FQSSLoss(lambda_kd=0.0)
    vanilla(student, target)
    assert vanilla.distillation_share == 0.0


def test_db_average_is_the_metric_average():
    """``average="db"``: at λ = 0 exactly Asteroid's PIT loss (the mean of dB SI-SDRs), while the paper's
    linear average weighs the best-separated example most; the distillation goes inside each source's log."""
    from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 2, 8000, generator=gen)
    levels = torch.tensor([10 ** (-20 / 20), 10 ** (-5 / 20)])[:, None, None]     # example 0 at 20 dB, 1 at 5 dB
    student = (target + levels * torch.randn(2, 2, 8000, generator=gen))[:, [1, 0]]
    pit = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    assert float(FQSSLoss(0.0, average="db")(student, target)) == pytest.approx(float(pit(student, target)), abs=1e-4)
    assert float(pit(student, target)) == pytest.approx(-12.5, abs=0.3)
    assert float(FQSSLoss(0.0)(student, target)) == pytest.approx(-10 * math.log10((100 + 10 ** 0.5) / 2), abs=0.3)
    teacher = student + 0.01 * torch.randn(2, 2, 8000, generator=gen)      # the student is ~40 dB from it
    loss = FQSSLoss(0.1, average="db")
    value = loss(student, target, teacher[:, [1, 0]])                     # any source order of the teacher
    assert float(value) == pytest.approx(float(loss(student, target, teacher)), abs=1e-5)
    assert float(value) < float(pit(student, target)) - 10 and 0.5 < loss.distillation_share < 1
    with pytest.raises(ValueError, match="average"):
        FQSSLoss(average="mean")
