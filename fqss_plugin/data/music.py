"""A toy MUSDB18-HQ: locally synthesized songs in MUSDB18-HQ's exact layout.

``generate_music(MusicConfig(out=DIR))`` writes::

    DIR/{train,test}/<Artist - Title>/{mixture,drums,bass,other,vocals}.wav   44.1 kHz, stereo, 16-bit
    DIR/music_summary.json

which ``musdb.DB(DIR, is_wav=True)`` and demucs' wav datasets read unchanged.
The first ``valid_tracks`` train songs take names from musdb's own
``validation_tracks`` list (e.g. "Actions - One Minute Smile"), so
``musdb.DB(..., subsets="train", split="valid")`` and demucs' validation split
are non-empty; all other names are procedural.

Each song (its own seed) has a tempo (84-140 BPM), a key (major or minor) and a
four-chord loop; bars last four beats.

* **drums**: kick (a 120 -> 45 Hz sine sweep), snare (noise + 185 Hz tone) and
  hi-hat (differentiated noise) one-shots on a 16-step grid, one of several
  patterns per song, a snare fill every fourth bar.
* **bass**: the chord root, one octave below the key, band-limited sawtooth
  with a plucked envelope, on an eighth-note rhythm.
* **other**: the chord as a sustained additive pad (left/right detuned by a few
  cents for width) plus, on some songs, a plucked sixteenth-note arpeggio.
* **vocals**: *sung* phrases - a glottal-like harmonic source at the melody
  pitch with 5.5 Hz vibrato, shaped by the formants of a vowel per note
  (additive synthesis: harmonic ``k`` gets weight ``1/k * sum_j 1 / (1 + ((k f0 -
  F_j) / (B_j / 2))^2)``) - and *spoken* phrases from espeak-ng, with silent bars
  between phrases as in real songs.

Stem loudness is set with the BS.1770 meter (:mod:`fqss_plugin.data.loudness`,
on the channel average) to a random target per stem; all stems are then scaled
together so that the mixture peaks at most at 0.9, quantized to 16 bits, and
``mixture.wav`` is the integer sum of the four stems, so that reading back
gives ``mixture == drums + bass + other + vocals`` exactly.
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import musdb
import numpy as np
import soundfile as sf
import yaml
from scipy.signal import resample_poly

from fqss_plugin.data.errors import DataGenerationError
from fqss_plugin.data.loudness import gain_for_loudness
from fqss_plugin.data.output import directory_bytes, prepare_output_dir
from fqss_plugin.data.parallel import parallel_map
from fqss_plugin.data.text import ADJECTIVES, NAMES, NOUNS, SentenceGenerator
from fqss_plugin.data.tools import require_tools, run_tool

SR = 44100
STEMS = ("drums", "bass", "other", "vocals")
STEM_LUFS = {"drums": (-18.0, -14.0), "bass": (-21.0, -17.0), "other": (-22.0, -18.0), "vocals": (-19.0, -15.0)}
MAX_AMP = 0.9
INT16_SCALE = 32768
TEMPO_BPM = (84.0, 140.0)
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
PROGRESSIONS = {"major": ((0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 4, 4), (5, 3, 0, 4)),
                "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 5, 3, 4))}
KICK_PATTERNS = ((0, 8), (0, 6, 8), (0, 7, 10), (0, 3, 8, 11), (0, 8, 10))
BASS_PATTERNS = ((0, 2, 4, 6), (0, 3, 4, 7), (0, 1, 2, 3, 4, 5, 6, 7), (0, 3, 6))
VOWEL_FORMANTS = {  # (F1, F2, F3) Hz, bandwidths (80, 100, 140) Hz
    "a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010), "o": (570, 840, 2410), "u": (300, 870, 2240),
}
FORMANT_BANDWIDTHS = (80.0, 100.0, 140.0)
ESPEAK_SINGER_VARIANTS = ("f1", "f2", "f3", "f4", "m1", "m2", "m3", "m4")
GENERATED = ("train", "test", "music_summary.json")


@dataclass(frozen=True)
class MusicConfig:
    """Parameters of :func:`generate_music` (the ``fqss make-data music`` options)."""

    out: Path
    train_tracks: int = 8
    test_tracks: int = 3
    valid_tracks: int = 2
    seconds: float = 20.0
    seed: int = 0
    jobs: int = 1
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`DataGenerationError` naming the first bad parameter."""
        if self.train_tracks < 1 or self.test_tracks < 1:
            raise DataGenerationError("--train-tracks and --test-tracks must be >= 1")
        if not 0 <= self.valid_tracks <= min(self.train_tracks, len(musdb_validation_names())):
            raise DataGenerationError(f"--valid-tracks must be between 0 and min(--train-tracks, "
                                      f"{len(musdb_validation_names())}) (got {self.valid_tracks})")
        if not self.seconds >= 2.0:
            raise DataGenerationError(f"--seconds must be >= 2 (got {self.seconds})")
        if self.jobs < 1:
            raise DataGenerationError(f"--jobs must be >= 1 (got {self.jobs})")


@dataclass(frozen=True)
class Track:
    """One song to synthesize: where it goes and the seed that decides everything about it."""

    subset: str
    name: str
    seed: int
    seconds: float


def musdb_validation_names() -> list[str]:
    """musdb's ``validation_tracks`` (read from the installed package's ``configs/mus.yaml``)."""
    with open(Path(musdb.__file__).parent / "configs" / "mus.yaml", encoding="utf-8") as handle:
        return list(yaml.safe_load(handle)["validation_tracks"])


def plan_music(config: MusicConfig) -> list[Track]:
    """Track names and seeds: ``valid_tracks`` musdb validation names first, then procedural names."""
    rng = np.random.default_rng(config.seed)
    names = musdb_validation_names()[: config.valid_tracks]
    taken = set(musdb_validation_names())
    while len(names) < config.train_tracks + config.test_tracks:
        name = _song_name(rng)
        if name not in taken:
            taken.add(name)
            names.append(name)
    subsets = ["train"] * config.train_tracks + ["test"] * config.test_tracks
    return [Track(subset, name, int(rng.integers(2**31)), config.seconds) for subset, name in zip(subsets, names)]


def _song_name(rng: np.random.Generator) -> str:
    def pick(words: tuple[str, ...]) -> str:
        return words[int(rng.integers(len(words)))].title()
    artist = f"The {pick(ADJECTIVES)} {pick(NOUNS)}s" if rng.random() < 0.5 else f"{pick(NAMES)} {pick(NOUNS)}"
    return f"{artist} - {pick(ADJECTIVES)} {pick(NOUNS)}"


def midi_to_hz(note: float) -> float:
    return 440.0 * 2 ** ((note - 69) / 12)


def _add(buffer: np.ndarray, start: int, sound: np.ndarray) -> None:
    """``buffer[start:start+len(sound)] += sound``, clipped to the buffer."""
    if start >= len(buffer):
        return
    end = min(len(buffer), start + len(sound))
    buffer[start:end] += sound[: end - start]


def _pan(mono: np.ndarray, position: float) -> np.ndarray:
    """Constant-power pan, ``position`` in [-1 (left), 1 (right)]: ``(n,) -> (n, 2)``."""
    angle = (position + 1) * np.pi / 4
    return np.stack([mono * np.cos(angle), mono * np.sin(angle)], axis=1)


def _harmonics(f0: float | np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """``sum_k weights[k-1] sin(k phi(t))`` with ``phi`` the integrated ``f0``; harmonics above 18 kHz dropped."""
    f0_track = np.broadcast_to(np.asarray(f0, dtype=np.float64), (n,))
    phase = 2 * np.pi * np.cumsum(f0_track) / SR
    out = np.zeros(n)
    for k, weight in enumerate(weights, start=1):
        if k * float(np.max(f0_track)) < 18000 and weight != 0:
            out += weight * np.sin(k * phase)
    return out


def _decay(n: int, seconds: float, attack_s: float = 0.002) -> np.ndarray:
    t = np.arange(n) / SR
    return np.minimum(1.0, t / attack_s) * np.exp(-t / seconds)


@dataclass(frozen=True)
class _Song:
    """Musical decisions of one track (drawn from its seed)."""

    beat: int  # samples per beat
    root: int  # MIDI note of the key's tonic (octave 3)
    scale: tuple[int, ...]
    progression: tuple[int, ...]
    n_bars: int

    def chord(self, bar: int) -> list[int]:
        """MIDI notes (octave 3-4) of the triad on the bar's scale degree."""
        degree = self.progression[bar % len(self.progression)]
        return [self.root + 12 * ((degree + step) // 7) + self.scale[(degree + step) % 7] for step in (0, 2, 4)]


def _drums(rng: np.random.Generator, song: _Song, n: int) -> np.ndarray:
    t = np.arange(int(0.4 * SR)) / SR
    kick = np.sin(2 * np.pi * np.cumsum(45 + 75 * np.exp(-t / 0.03)) / SR) * np.exp(-t / 0.12)
    snare_noise = np.diff(rng.standard_normal(len(t) + 1)) * 0.5
    snare = (snare_noise * np.exp(-t / rng.uniform(0.08, 0.15)) + np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.05))
    hat = np.diff(rng.standard_normal(len(t) + 2), 2) * 0.25 * np.exp(-t / rng.uniform(0.02, 0.04))
    kicks = KICK_PATTERNS[int(rng.integers(len(KICK_PATTERNS)))]
    hat_step = int(rng.choice([1, 2]))
    step = song.beat // 4
    center, right = np.zeros(n), np.zeros(n)
    for bar in range(song.n_bars):
        start = bar * 16 * step
        fill = bar % 4 == 3
        for s in range(16):
            at = start + s * step
            if s in kicks:
                _add(center, at, kick)
            if s in (4, 12) or (fill and s >= 13) or (not fill and rng.random() < 0.05):
                _add(center, at, snare * (1.0 if s in (4, 12) else 0.5))
            if s % hat_step == 0:
                _add(right, at, hat * (1.0 if s % 4 == 0 else 0.6))
    return _pan(center, 0.0) + _pan(right, 0.35)


def _bass(rng: np.random.Generator, song: _Song, n: int) -> np.ndarray:
    pattern = BASS_PATTERNS[int(rng.integers(len(BASS_PATTERNS)))]
    eighth = song.beat // 2
    k = np.arange(1, 25)
    weights = (1 / k) * np.exp(-k / rng.uniform(4, 10))
    out = np.zeros(n)
    for bar in range(song.n_bars):
        f0 = midi_to_hz(song.chord(bar)[0] - 12)
        note = _harmonics(f0, weights, eighth * 2) * _decay(eighth * 2, rng.uniform(0.15, 0.4), 0.004)
        for e in pattern:
            _add(out, bar * 8 * eighth + e * eighth, note)
    return _pan(out, 0.0)


def _other(rng: np.random.Generator, song: _Song, n: int) -> np.ndarray:
    bar_len = 4 * song.beat
    weights = 1 / np.arange(1, 7) ** 2
    left, right = np.zeros(n), np.zeros(n)
    swell = np.minimum(1.0, np.arange(bar_len) / (0.05 * SR)) * np.minimum(1.0, (bar_len - np.arange(bar_len)) / (0.05 * SR))
    detune = 2 ** (rng.uniform(2, 6) / 1200)
    arpeggio = rng.random() < 0.6
    pluck_weights = 1 / np.arange(1, 9) ** 1.5
    step = song.beat // 4
    arp = np.zeros(n)
    for bar in range(song.n_bars):
        notes = song.chord(bar)
        start = bar * bar_len
        for note in notes:
            f0 = midi_to_hz(note + 12)
            _add(left, start, 0.3 * _harmonics(f0 / detune, weights, bar_len) * swell)
            _add(right, start, 0.3 * _harmonics(f0 * detune, weights, bar_len) * swell)
        if arpeggio:
            for s in range(16):
                f0 = midi_to_hz(notes[s % 3] + 24)
                _add(arp, start + s * step, 0.25 * _harmonics(f0, pluck_weights, 2 * step) * _decay(2 * step, 0.08))
    return np.stack([left, right], axis=1) + _pan(arp, -0.5)


def _sung_note(f0: float, vowel: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """One sung syllable: vibrato harmonic source weighted by the vowel's formant resonances."""
    harmonics = np.arange(1, int(5000 / f0) + 1)
    resonance = sum(1 / (1 + ((harmonics * f0 - formant) / (bandwidth / 2)) ** 2)
                    for formant, bandwidth in zip(VOWEL_FORMANTS[vowel], FORMANT_BANDWIDTHS))
    weights = resonance / harmonics
    t = np.arange(n) / SR
    vibrato = 1 + rng.uniform(0.008, 0.02) * np.sin(2 * np.pi * 5.5 * t) * np.minimum(1.0, t / 0.25)
    envelope = np.minimum(1.0, t / 0.04) * np.minimum(1.0, (n - np.arange(n)) / (0.06 * SR))
    return _harmonics(f0 * vibrato, weights, n) * envelope


def _spoken_phrase(rng: np.random.Generator, sentences: SentenceGenerator) -> np.ndarray:
    """A short espeak-ng phrase (built-in variant, random pitch and speed) at 44.1 kHz."""
    variant = ESPEAK_SINGER_VARIANTS[int(rng.integers(len(ESPEAK_SINGER_VARIANTS)))]
    command = ["espeak-ng", "-v", f"en-us+{variant}", "-p", str(int(rng.integers(30, 70))),
               "-s", str(int(rng.integers(140, 190))), "--stdout", sentences.sentence(int(rng.integers(4, 8)))]
    audio, sr = sf.read(io.BytesIO(run_tool(command)), dtype="float64")
    divisor = math.gcd(sr, SR)
    return resample_poly(audio, SR // divisor, sr // divisor)


def _vocals(rng: np.random.Generator, song: _Song, n: int) -> np.ndarray:
    """Two-bar phrases: sung (p = 0.5), spoken (p = 0.25) or silent (p = 0.25)."""
    sentences = SentenceGenerator(rng)
    register = int(rng.choice([0, 12]))  # low (tenor) or high (alto/soprano) voice
    melody_notes = [song.root + register + offset for offset in (*song.scale, 12, 14)]
    bar_len = 4 * song.beat
    out = np.zeros(n)
    for phrase_start in range(0, song.n_bars, 2):
        kind = rng.choice(["sung", "spoken", "rest"], p=[0.5, 0.25, 0.25])
        at = phrase_start * bar_len
        if kind == "spoken":
            _add(out, at, 0.8 * _spoken_phrase(rng, sentences))
        elif kind == "sung":
            position = at
            while position < at + 2 * bar_len - song.beat // 2:
                length = song.beat * int(rng.choice([1, 1, 2]))
                note = melody_notes[int(rng.integers(len(melody_notes)))]
                vowel = "aeiou"[int(rng.integers(5))]
                _add(out, position, _sung_note(midi_to_hz(note), vowel, length, rng))
                position += length
    return _pan(out, float(rng.uniform(-0.1, 0.1)))


def synthesize_track(track: Track) -> dict[str, np.ndarray]:
    """The four stems of ``track`` as int16 arrays ``(n, 2)``, levelled and safe to sum without clipping."""
    rng = np.random.default_rng(track.seed)
    n = int(round(track.seconds * SR))
    mode = "major" if rng.random() < 0.5 else "minor"
    beat = int(round(60 / rng.uniform(*TEMPO_BPM) * SR))
    progressions = PROGRESSIONS[mode]
    song = _Song(beat, int(rng.integers(48, 60)), SCALES[mode], progressions[int(rng.integers(len(progressions)))],
                 math.ceil(n / (4 * beat)))
    stems = {"drums": _drums(rng, song, n), "bass": _bass(rng, song, n), "other": _other(rng, song, n),
             "vocals": _vocals(rng, song, n)}
    for name, stem in stems.items():
        stems[name] = stem * gain_for_loudness(stem.mean(axis=1), SR, float(rng.uniform(*STEM_LUFS[name])))
    peak = float(np.max(np.abs(sum(stems.values()))))
    scale = min(1.0, MAX_AMP / peak) if peak > 0 else 1.0
    return {name: np.round(stem * scale * INT16_SCALE).astype(np.int16) for name, stem in stems.items()}


def _write_track(args: tuple[Track, Path]) -> float:
    """Synthesize one track into ``<out>/<subset>/<name>/``; return its duration in seconds."""
    track, out = args
    stems = synthesize_track(track)
    folder = out / track.subset / track.name
    folder.mkdir(parents=True, exist_ok=True)
    for name in STEMS:
        sf.write(folder / f"{name}.wav", stems[name], SR, subtype="PCM_16")
    mixture = np.sum([stems[name].astype(np.int32) for name in STEMS], axis=0).astype(np.int16)
    sf.write(folder / "mixture.wav", mixture, SR, subtype="PCM_16")
    return len(mixture) / SR


def generate_music(config: MusicConfig) -> dict[str, object]:
    """Generate the toy MUSDB18-HQ under ``config.out``; return (and save) the summary."""
    config.validate()
    require_tools("espeak-ng")
    out = config.out.resolve()
    prepare_output_dir(out, GENERATED, config.overwrite)
    tracks = plan_music(config)
    start = time.perf_counter()
    durations = parallel_map(_write_track, [(t, out) for t in tracks], config.jobs, "synthesize songs", config.progress)
    elapsed = time.perf_counter() - start
    size = directory_bytes(out / "train") + directory_bytes(out / "test")
    hours = sum(durations) / 3600
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "tracks": {subset: [t.name for t in tracks if t.subset == subset] for subset in ("train", "test")},
        "hours": round(hours, 4),
        "seconds": round(elapsed, 1),
        "tracks_per_minute": round(len(tracks) / elapsed * 60, 1),
        "MB": round(size / 1e6, 1),
        "MB_per_hour": round(size / 1e6 / hours, 1),
    }
    (out / "music_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
