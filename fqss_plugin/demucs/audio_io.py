"""A soundfile backend for Demucs' dataset code (``demucs.wav``), which calls ``torchaudio.load/info/save``:
torchaudio 2.9 and later have no audio I/O.

:func:`use_soundfile_backend` points ``demucs.wav``'s ``ta`` at :data:`SOUNDFILE_TORCHAUDIO`, which has the
three functions with torchaudio's signatures and return types (``[channels, frames]`` float32 tensors;
an info object with ``num_frames``, ``sample_rate``, ``num_channels``). Demucs' ``Wavset`` and
``get_musdb_wav_datasets`` then read MUSDB18-HQ's wav folders unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch


@dataclass(frozen=True)
class AudioInfo:
    """torchaudio's ``AudioMetaData`` fields that Demucs reads."""

    sample_rate: int
    num_frames: int
    num_channels: int


def info(path: str | Path) -> AudioInfo:
    meta = sf.info(str(path))
    return AudioInfo(meta.samplerate, meta.frames, meta.channels)


def load(path: str | Path, frame_offset: int = 0, num_frames: int = -1) -> tuple[torch.Tensor, int]:
    """``(wav [channels, frames] float32, sample_rate)`` from ``frame_offset``, ``num_frames`` frames (-1: all)."""
    wav, rate = sf.read(str(path), start=frame_offset, frames=num_frames, dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(wav.T)), rate


def save(path: str | Path, wav: torch.Tensor, sample_rate: int, encoding: str | None = None, **_) -> None:
    """``wav`` ``[channels, frames]``; ``encoding="PCM_F"`` writes 32-bit float (torchaudio's meaning), else PCM 16."""
    subtype = "FLOAT" if encoding == "PCM_F" else "PCM_16"
    sf.write(str(path), wav.detach().cpu().numpy().T, sample_rate, subtype=subtype)


SOUNDFILE_TORCHAUDIO = SimpleNamespace(info=info, load=load, save=save)


def use_soundfile_backend() -> None:
    """Make ``demucs.wav`` read and write audio through soundfile (idempotent)."""
    import demucs.wav
    demucs.wav.ta = SOUNDFILE_TORCHAUDIO
