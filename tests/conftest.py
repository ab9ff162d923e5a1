from contextlib import contextmanager

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


@contextmanager
def single_thread():
    """One intra-op thread inside the block (for module-scoped fixtures, which cannot use ``one_thread``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """For tests of many small ops: on a shared CPU one intra-op thread is faster and steadier."""
    with single_thread():
        yield


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def assert_freeze_is_bit_exact(model: torch.nn.Module, x: torch.Tensor) -> None:
    """``freeze`` leaves the eval output bit-identical and no learnable quantizer parameter behind."""
    import fqss_plugin as fq
    model.eval()
    with torch.no_grad():
        before = model(x)
        fq.freeze(model)
        after = model(x)
    assert torch.equal(before, after)
    assert not any("quantizer" in name for name, _ in model.named_parameters())


@torch.no_grad()
def error_after_one_calibration_step(float_model: torch.nn.Module, quantized: torch.nn.Module,
                                     x: torch.Tensor) -> float:
    """Calibrate ``quantized`` on ``x`` for one step, then its relative error to ``float_model`` in eval mode."""
    import fqss_plugin as fq
    quantized.train()(x)
    fq.calibration_step(quantized)
    return relative_error(quantized.eval()(x), float_model.eval()(x))


HF_SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def seed_hf_cache(home, repo_id: str, files: dict[str, bytes]) -> None:
    """A Hugging Face hub cache under ``home`` (``HF_HOME``) holding ``files`` for ``repo_id``, as a download
    leaves it; ``huggingface_hub`` reads it with ``HF_HUB_OFFLINE=1``."""
    from pathlib import Path
    repo = Path(home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(HF_SNAPSHOT)
    snapshot = repo / "snapshots" / HF_SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)


def load_script(path, name: str | None = None):
    """A recipe script (``train.py``) imported as a module, without running its ``__main__`` block."""
    import importlib.util
    from pathlib import Path
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or f"recipe_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def toy_musdb(tmp_path_factory):
    """A toy MUSDB18-HQ (``fqss make-data music``): 3 train songs (1 named as a musdb validation track) and
    1 test song of 4 s, shared by the music tests (read only)."""
    from fqss_plugin.data.music import MusicConfig, generate_music

    root = tmp_path_factory.mktemp("musdb")
    generate_music(MusicConfig(out=root, train_tracks=3, test_tracks=1, valid_tracks=1, seconds=4.0, jobs=1,
                               progress=False))
    return root
