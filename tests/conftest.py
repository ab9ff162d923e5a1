import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def speech_like(batch: int = 2, length: int = 16000, sample_rate: int = 8000, seed: int = 0) -> torch.Tensor:
    """Voiced-speech-like test signal: a gliding harmonic stack under a syllable-rate envelope, plus breath noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / sample_rate
    out = []
    for b in range(batch):
        f0 = 100 + 80 * b + 20 * torch.sin(2 * torch.pi * 0.7 * t)
        phase = 2 * torch.pi * torch.cumsum(f0, 0) / sample_rate
        voiced = sum(torch.sin(k * phase) / k for k in range(1, 12))
        envelope = torch.relu(torch.sin(2 * torch.pi * 3.1 * t + b)) ** 2
        noise = 0.02 * torch.randn(length, generator=gen)
        out.append(0.4 * envelope * voiced + noise)
    return torch.stack(out)


def snr_db(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - estimate).pow(2).sum()))
