"""Real recorded speech for ``fqss make-data speech --real-speech DIR``: reading, speaker split, utterances.

**Layout read.** Every ``.wav``/``.flac``/``.ogg`` under ``DIR`` (recursively).  A file's
speaker is the path of its folder relative to ``DIR`` (``fsdd/george/7_george_3.wav`` ->
speaker ``fsdd/george``; the layout :mod:`fqss_plugin.data.real_sources` writes).  Files
directly in ``DIR`` (a flat folder) take their speaker from ``speaker_pattern``, a regular
expression whose first group, matched against the file name, is the speaker
(default :data:`DEFAULT_SPEAKER_PATTERN`: the name up to the first ``_`` or ``-``).
A missing folder, or one without readable audio, raises one :class:`DataGenerationError`
naming the folder.  Speakers with less than :data:`MIN_SPEAKER_SECONDS` of audio are left out.

**Speaker split.** :func:`split_speakers` assigns every speaker to exactly one of
``train``, ``dev`` and ``test``: within each *group* (the first path component, e.g. ``fsdd``,
so every source reaches every split), speakers are ordered by ``sha256(f"{seed}:{speaker}")``
and the first ``round(test_fraction * n)`` go to test, the next ``round(dev_fraction * n)``
to dev (at least one each when the group has three speakers or more), the rest to train.
The split depends on the seed and the speaker names only, not on file order or count.

**Utterances.** Recordings are of any length (0.3 s digits to 30 s audiobook sentences);
an utterance of a target length ``T ~ U(2, 6) s`` (:func:`plan_real_utterance`) takes the
speaker's recordings in a random order, from each a random excerpt of at most the time still
missing, joined by 50-300 ms pauses, until ``T`` is reached or the recordings run out.
:func:`render_real_utterance` reads the excerpts (soundfile), mixes down to mono,
resamples to the target rate (``torchaudio.functional.resample``), trims silence at both
ends of each recording, equalises the excerpts' RMS, and fades every excerpt in and out
over 10 ms.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from fqss_plugin.data.errors import DataGenerationError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
DEFAULT_SPEAKER_PATTERN = r"^([^_\-]+)"
MIN_SPEAKER_SECONDS = 2.0
MIN_RECORDING_SECONDS = 0.15
GAP_SECONDS = (0.05, 0.3)
FADE_SECONDS = 0.01
TRIM_BELOW_PEAK_DB = -40.0
UTTERANCE_SECONDS = (2.0, 6.0)
REAL_SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Recording:
    """One audio file of a real speaker (``seconds`` from its header)."""

    path: Path
    seconds: float


@dataclass(frozen=True)
class Excerpt:
    """``[start, start + seconds)`` of a recording, followed by ``gap`` seconds of silence."""

    path: str
    start: float
    seconds: float
    gap: float


def scan_real_speech(root: Path, speaker_pattern: str | None = None) -> dict[str, list[Recording]]:
    """``{speaker: recordings sorted by path}`` of the audio under ``root`` (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataGenerationError(f"--real-speech {root}: no such directory (expected <speaker>/<file>.wav "
                                  "folders, e.g. the output of `fqss make-data real-sources`)")
    pattern = re.compile(speaker_pattern or DEFAULT_SPEAKER_PATTERN)
    speakers: dict[str, list[Recording]] = {}
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    for path in files:
        try:
            info = sf.info(path)
        except (RuntimeError, sf.LibsndfileError):
            continue
        if info.duration < MIN_RECORDING_SECONDS:
            continue
        relative = path.relative_to(root)
        if len(relative.parts) > 1:
            speaker = relative.parent.as_posix()
        else:
            match = pattern.search(path.name)
            if not match:
                continue
            speaker = match.group(1) if match.groups() else match.group(0)
        speakers.setdefault(speaker, []).append(Recording(path, float(info.duration)))
    if not speakers:
        raise DataGenerationError(f"--real-speech {root} holds no readable audio ({', '.join(AUDIO_SUFFIXES)} "
                                  "files in <speaker>/ folders, or named by --speaker-pattern)")
    return {s: r for s, r in sorted(speakers.items()) if sum(x.seconds for x in r) >= MIN_SPEAKER_SECONDS}


def speaker_group(speaker: str) -> str:
    """The first path component (the source), ``""`` for speakers of a flat folder."""
    return speaker.split("/")[0] if "/" in speaker else ""


def split_speakers(speakers: list[str], seed: int, dev_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """``{"train": [...], "dev": [...], "test": [...]}``, disjoint and deterministic (module docstring)."""
    groups: dict[str, list[str]] = {}
    for speaker in speakers:
        groups.setdefault(speaker_group(speaker), []).append(speaker)
    split: dict[str, list[str]] = {name: [] for name in REAL_SPLITS}
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
        n = len(members)
        n_test = round(test_fraction * n)
        n_dev = round(dev_fraction * n)
        if n >= 3:
            n_test, n_dev = max(1, n_test) if test_fraction > 0 else 0, max(1, n_dev) if dev_fraction > 0 else 0
        n_test = min(n_test, n)
        n_dev = min(n_dev, n - n_test)
        split["test"] += members[:n_test]
        split["dev"] += members[n_test:n_test + n_dev]
        split["train"] += members[n_test + n_dev:]
    return {name: sorted(members) for name, members in split.items()}


def plan_real_utterance(rng: np.random.Generator, recordings: list[Recording]) -> tuple[Excerpt, ...]:
    """Excerpts that make one utterance of ``U(2, 6)`` seconds (module docstring)."""
    target = float(rng.uniform(*UTTERANCE_SECONDS))
    excerpts: list[Excerpt] = []
    total = 0.0
    for index in rng.permutation(len(recordings)):
        missing = target - total
        if missing < 0.3:
            break
        recording = recordings[int(index)]
        take = min(recording.seconds, missing)
        start = float(rng.uniform(0, recording.seconds - take)) if recording.seconds > take else 0.0
        gap = float(rng.uniform(*GAP_SECONDS))
        excerpts.append(Excerpt(str(recording.path), round(start, 4), round(take, 4), round(gap, 4)))
        total += take + gap
    return tuple(excerpts)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Mono float64 waveform of ``path`` at ``sample_rate`` (soundfile + ``torchaudio.functional.resample``)."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        import torch
        import torchaudio.functional as AF

        audio = AF.resample(torch.from_numpy(np.ascontiguousarray(audio)), rate, sample_rate).numpy()
    return audio.astype(np.float64)


def _trim(x: np.ndarray) -> np.ndarray:
    if not np.any(x):
        return x
    loud = np.nonzero(np.abs(x) > np.max(np.abs(x)) * 10 ** (TRIM_BELOW_PEAK_DB / 20))[0]
    return x[loud[0] : loud[-1] + 1]


def render_real_utterance(excerpts: tuple[Excerpt, ...], sample_rate: int) -> np.ndarray:
    """The utterance planned by :func:`plan_real_utterance`, at ``sample_rate`` (module docstring)."""
    fade = int(FADE_SECONDS * sample_rate)
    pieces = []
    for excerpt in excerpts:
        audio = _trim(load_audio(excerpt.path, sample_rate))
        length = min(len(audio), max(1, int(round(excerpt.seconds * sample_rate))))
        start = min(int(round(excerpt.start * sample_rate)), len(audio) - length)
        piece = audio[start : start + length].copy()
        rms = float(np.sqrt(np.mean(piece**2)))
        if rms > 0:
            piece *= 0.05 / rms
        n = min(fade, len(piece) // 2)
        if n > 0:
            ramp = np.linspace(0.0, 1.0, n)
            piece[:n] *= ramp
            piece[-n:] *= ramp[::-1]
        pieces += [piece, np.zeros(int(round(excerpt.gap * sample_rate)))]
    audio = np.concatenate(pieces[:-1]) if pieces else np.zeros(sample_rate)
    peak = float(np.max(np.abs(audio)))
    return audio * (0.9 / peak) if peak > 0.9 else audio
