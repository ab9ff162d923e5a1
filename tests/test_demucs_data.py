"""Demucs' own MUSDB18-HQ dataset code (``demucs.wav``) reads the toy MUSDB18-HQ through the soundfile backend."""
from __future__ import annotations

from types import SimpleNamespace

import soundfile as sf
import torch

from fqss_plugin.demucs.audio_io import load, use_soundfile_backend

SOURCES = ["drums", "bass", "other", "vocals"]


def test_demucs_wav_datasets_read_the_toy_musdb(toy_musdb, tmp_path):
    from demucs.wav import get_musdb_wav_datasets

    root = toy_musdb
    use_soundfile_backend()
    args = SimpleNamespace(musdb=str(root), metadata=str(tmp_path / "metadata"), sources=SOURCES, segment=2,
                           shift=1, samplerate=44100, channels=2, normalize=True, train_valid=False, full_cv=True)
    train_set, valid_set = get_musdb_wav_datasets(args)
    assert len(valid_set) == 1 and len(train_set) >= 2 * 2      # 2 train songs, 4 s each, 2 s segments, 1 s shift
    example = train_set[0]
    assert example.shape == (4, 2, 2 * 44100) and example.dtype == torch.float32
    track = next(p for p in (root / "train").iterdir() if p.name in train_set.metadata)
    first_second, rate = load(track / "drums.wav", num_frames=44100)
    assert rate == 44100 and first_second.shape == (2, 44100)
    reference, _ = sf.read(track / "drums.wav", frames=44100, dtype="float32")
    assert torch.equal(first_second, torch.from_numpy(reference.T.copy()))
    mixture, *stems = valid_set[0]                 # each normalised by the track's mixture mean and std
    meta = next(iter(valid_set.metadata.values()))
    offset = (len(stems) - 1) * meta["mean"] / meta["std"]      # (m - μ)/σ - Σ (s - μ)/σ with m = Σ s
    assert torch.allclose(mixture - sum(stems), torch.full_like(mixture, offset), atol=1e-5)
