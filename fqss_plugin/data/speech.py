"""Synthetic Libri2Mix: TTS utterances in a LibriSpeech-shaped tree, mixed by LibriMix's rule.

``generate_speech(SpeechConfig(out=DIR))`` writes::

    DIR/LibriSpeech/SPEAKERS.TXT                              speakers, LibriSpeech's format
    DIR/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>-<nnnn>.flac   16 kHz utterances
    DIR/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>.trans.txt     transcripts
    DIR/Libri2Mix/wav8k/min/...                               LibriMix's layout (see librimix.py)
    DIR/data/wav8k/min/<split>/mixture_<split>_<type>.csv     Asteroid's recipe-local metadata
    DIR/data/test_annotations.csv                             utt_id,text (Asteroid's eval.py)
    DIR/voices.csv                                            synthesis parameters + measured f0
    DIR/real_speakers.csv                                     with --real-speech: real speakers and their split
    DIR/speech_summary.json                                   sizes, speeds, f0 statistics

Splits (LibriSpeech subset -> Libri2Mix split): ``train-clean-360 -> train-360``,
``dev-clean -> dev``, ``test-clean -> test`` from espeak-ng voices, and the
cross-engine ``test-flite -> test-flite`` from flite voices.  Every speaker
belongs to exactly one split (speaker ids are drawn without replacement).

As in LibriMix, each train utterance is used in exactly one mixture, while the
evaluation splits mix ``n + 1`` utterances into ``n`` distinct pairs (utterances
recur).  The two speakers of a mixture always differ.  Utterances last about
2-6 s (target duration uniform in :data:`UTTERANCE_SECONDS`, turned into a word
count through the voice's speaking rate), and mixtures in ``min`` mode about
3.3 s on average, which sizes the train split from ``hours``.

**Real speech** (``real_speech=DIR``, :mod:`fqss_plugin.data.real`): the real speakers of
``DIR`` are split disjointly (seeded hash within each source) into train-360, dev and a
real-only ``test-real`` split (``LibriSpeech/test-real``, ``Libri2Mix/.../test-real``, same layout
and metadata as ``test``); in train-360 each voice of a mixture is real with probability
``real_fraction``, dev deals its utterances over its synthetic and real speakers, and
``test``/``test-flite`` stay synthetic.  Real speakers get ids from :data:`REAL_SPEAKER_ID_START`
on (sorted by folder name) and are listed in ``DIR/real_speakers.csv``.  With ``augment``
(default: on with ``real_speech``), train-360 and dev voices get speed, pitch, EQ, room and
noise variation and wider loudness draws (:mod:`fqss_plugin.data.augment`); the evaluation
splits are never augmented.  Without these options the output is byte-identical to the
synthetic-only generator's.

Everything random is drawn up front from ``numpy.random.default_rng(seed)`` in
the main process, so the output is identical for a given seed whatever
``jobs`` is, and the wav8k and wav16k versions hold the same mixtures.
"""
from __future__ import annotations

import csv
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from fqss_plugin.data.errors import DataGenerationError
from fqss_plugin.data.librimix import (
    LIBRISPEECH_SR, MIX_TYPES, MODES, NOISE_LUFS, SAMPLE_RATES, SPEECH_LUFS, MixtureRows, create_local_metadata,
    librimix_gains, make_split_dirs, mode_dir, render_sources, wav_dir_name, write_metadata, write_mixture,
)
from fqss_plugin.data.noise import synthesize_noise
from fqss_plugin.data.output import directory_bytes, prepare_output_dir
from fqss_plugin.data.parallel import parallel_map
from fqss_plugin.data.pitch import median_f0
from fqss_plugin.data.real import Excerpt, Recording, plan_real_utterance, render_real_utterance, scan_real_speech, \
    speaker_group, split_speakers
from fqss_plugin.data.text import SentenceGenerator, transcript
from fqss_plugin.data.tools import require_tools
from fqss_plugin.data.voices import Voice, sample_voices, write_espeak_data

TRAIN, DEV, TEST, CROSS, TEST_REAL = "train-360", "dev", "test", "test-flite", "test-real"
LIBRISPEECH_SUBSET = {TRAIN: "train-clean-360", DEV: "dev-clean", TEST: "test-clean", CROSS: "test-flite",
                      TEST_REAL: "test-real"}
AUGMENTED_SPLITS = (TRAIN, DEV)
REAL_SPEAKER_ID_START = 10000  # above SPEAKER_ID_RANGE: real and synthetic ids never collide
UTTERANCE_SECONDS = (2.0, 6.0)
MEAN_MIN_MIXTURE_SECONDS = 3.3
EVAL_FRACTION = 0.1
SPEAKER_ID_RANGE = (100, 10000)
CHAPTER_ID_RANGE = (1000, 100000)
F0_UTTERANCES_PER_SPEAKER = 3
TRIM_BELOW_PEAK_DB = -50.0
TRIM_MARGIN_S = 0.1
# Spoken duration ~ LEAD_S + words * 60 / (WORDS_FACTOR * rate_wpm) (measured on these sentences);
# the sentence generator overshoots its word target by ~OVERSHOOT_WORDS on average.
LEAD_S = 0.4
WORDS_FACTOR = 1.18
OVERSHOOT_WORDS = 2
GENERATED = ("LibriSpeech", "Libri2Mix", "data", "voices.csv", "speech_summary.json", "real_speakers.csv")


@dataclass(frozen=True)
class SpeechConfig:
    """Parameters of :func:`generate_speech` (the ``fqss make-data speech`` options)."""

    out: Path
    hours: float = 1.0
    seed: int = 0
    sample_rates: tuple[int, ...] = (8000,)
    modes: tuple[str, ...] = ("min",)
    mix_types: tuple[str, ...] = MIX_TYPES
    train_speakers: int = 100
    eval_speakers: int = 20
    eval_mixtures: int | None = None
    cross_engine: bool = True
    jobs: int = 1
    overwrite: bool = False
    progress: bool = True
    real_speech: Path | None = None
    speaker_pattern: str | None = None
    real_fraction: float = 0.5
    real_dev_fraction: float = 0.1
    real_test_fraction: float = 0.15
    real_test_mixtures: int | None = None
    augment: bool | None = None

    @property
    def augmented(self) -> bool:
        """Realism augmentation of train/dev voices: ``augment``, by default on exactly with ``real_speech``."""
        return self.real_speech is not None if self.augment is None else self.augment

    def validate(self) -> None:
        """Raise :class:`DataGenerationError` naming the first bad parameter."""
        if not self.hours > 0:
            raise DataGenerationError(f"--hours must be > 0 (got {self.hours})")
        bad_rates = [r for r in self.sample_rates if r not in SAMPLE_RATES]
        if bad_rates or not self.sample_rates:
            raise DataGenerationError(f"--sample-rate must be 8000 or 16000 (got {list(self.sample_rates)})")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise DataGenerationError(f"--mode must be min or max (got {list(self.modes)})")
        if not self.mix_types or any(t not in MIX_TYPES for t in self.mix_types):
            raise DataGenerationError(f"--types must be among {', '.join(MIX_TYPES)} (got {list(self.mix_types)})")
        if self.train_speakers < 2 or self.eval_speakers < 2:
            raise DataGenerationError("--train-speakers and --eval-speakers must be >= 2 (two speakers per mixture)")
        if self.eval_mixtures is not None and self.eval_mixtures < 1:
            raise DataGenerationError(f"--eval-mixtures must be >= 1 (got {self.eval_mixtures})")
        if self.jobs < 1:
            raise DataGenerationError(f"--jobs must be >= 1 (got {self.jobs})")
        if not 0 <= self.real_fraction <= 1:
            raise DataGenerationError(f"--real-fraction must be in [0, 1] (got {self.real_fraction})")
        if not (0 <= self.real_dev_fraction < 1 and 0 < self.real_test_fraction < 1
                and self.real_dev_fraction + self.real_test_fraction < 1):
            raise DataGenerationError("--real-dev-fraction and --real-test-fraction must be in [0, 1) with "
                                      f"0 < test and dev + test < 1 (got {self.real_dev_fraction}, "
                                      f"{self.real_test_fraction})")
        if self.real_test_mixtures is not None and self.real_test_mixtures < 1:
            raise DataGenerationError(f"--real-test-mixtures must be >= 1 (got {self.real_test_mixtures})")

    @property
    def train_mixtures(self) -> int:
        return max(1, math.ceil(self.hours * 3600 / MEAN_MIN_MIXTURE_SECONDS))

    @property
    def mixtures_per_eval_split(self) -> int:
        if self.eval_mixtures is not None:
            return self.eval_mixtures
        return max(1, round(EVAL_FRACTION * self.train_mixtures))


@dataclass(frozen=True)
class RealVoice:
    """A speaker of real recordings (``name``: its folder under ``--real-speech``), in :class:`Voice`'s shape."""

    speaker_id: int
    name: str
    recordings: tuple[Recording, ...]
    sex: str = "?"
    engine: str = "real"
    f0_target_hz: float = float("nan")
    f0_range_hz: float = float("nan")
    rate_wpm: float = float("nan")
    formant_scale: tuple[float, ...] = ()
    roughness: int = 0

    @property
    def base(self) -> str:
        return self.name

    def describe(self) -> str:
        return f"real {self.name}"


@dataclass(frozen=True)
class Utterance:
    """One synthesized sentence or real-speech excerpt list; ``utterance_id`` is ``<speaker>-<chapter>-<nnnn>``."""

    utterance_id: str
    split: str
    voice: Voice | RealVoice
    text: str
    excerpts: tuple[Excerpt, ...] = ()

    @property
    def relative_path(self) -> Path:
        speaker, chapter, _ = self.utterance_id.split("-")
        return Path(LIBRISPEECH_SUBSET[self.split]) / speaker / chapter / f"{self.utterance_id}.flac"


@dataclass(frozen=True)
class Mixture:
    """Two utterances of different speakers and the LibriMix level draws for them and the noise."""

    split: str
    utterances: tuple[Utterance, Utterance]
    speech_lufs: tuple[float, float]
    noise_lufs: float
    noise_seed: int
    augment_seed: int | None = None

    @property
    def mixture_id(self) -> str:
        return "_".join(u.utterance_id for u in self.utterances)


@dataclass
class SpeechPlan:
    """Everything :func:`generate_speech` will write, decided before any synthesis."""

    voices: dict[str, list[Voice]]
    utterances: list[Utterance]
    mixtures: list[Mixture]
    f0_checked: set[str]  # ids of the utterances whose f0 is measured (the first few of each speaker)


@dataclass
class _SpeakerUtterances:
    """Hands out utterance ids and texts for one speaker."""

    voice: Voice
    chapter: int
    split: str
    count: int = 0
    made: list[Utterance] = field(default_factory=list)

    def new(self, rng: np.random.Generator, sentences: SentenceGenerator) -> Utterance:
        seconds = rng.uniform(*UTTERANCE_SECONDS)
        words = max(3, round((seconds - LEAD_S) * WORDS_FACTOR * self.voice.rate_wpm / 60) - OVERSHOOT_WORDS)
        utterance = Utterance(f"{self.voice.speaker_id}-{self.chapter}-{self.count:04d}", self.split, self.voice,
                              sentences.sentence(words))
        self.count += 1
        self.made.append(utterance)
        return utterance


@dataclass
class _RealSpeakerUtterances(_SpeakerUtterances):
    """Hands out utterance ids and excerpt lists for one real speaker (``sentences`` unused)."""

    def new(self, rng: np.random.Generator, sentences: SentenceGenerator) -> Utterance:
        voice = self.voice
        assert isinstance(voice, RealVoice)
        utterance = Utterance(f"{voice.speaker_id}-{self.chapter}-{self.count:04d}", self.split, voice, "",
                              plan_real_utterance(rng, list(voice.recordings)))
        self.count += 1
        self.made.append(utterance)
        return utterance


def _levels(rng: np.random.Generator) -> tuple[tuple[float, float], float, int]:
    speech = (float(rng.uniform(*SPEECH_LUFS)), float(rng.uniform(*SPEECH_LUFS)))
    return speech, float(rng.uniform(*NOISE_LUFS)), int(rng.integers(2**31))


def _plan_train(rng: np.random.Generator, speakers: list[_SpeakerUtterances], n_mixtures: int,
                sentences: SentenceGenerator) -> list[Mixture]:
    """Each mixture: two distinct random speakers, a fresh utterance from each (used once)."""
    mixtures = []
    for _ in range(n_mixtures):
        a, b = rng.choice(len(speakers), size=2, replace=False)
        pair = (speakers[a].new(rng, sentences), speakers[b].new(rng, sentences))
        mixtures.append(Mixture(speakers[a].split, pair, *_levels(rng)))
    return mixtures


def _plan_eval(rng: np.random.Generator, speakers: list[_SpeakerUtterances], n_mixtures: int,
               sentences: SentenceGenerator) -> list[Mixture]:
    """``n + 1`` utterances dealt round-robin to the speakers, then ``n`` distinct different-speaker pairs.

    With at least two speakers dealt evenly, there are at least ``n`` such pairs
    (``floor((n+1)/2) * ceil((n+1)/2) >= n``), so the rejection loop ends.
    """
    order = rng.permutation(len(speakers))
    pool = [speakers[order[k % len(speakers)]].new(rng, sentences) for k in range(n_mixtures + 1)]
    seen: set[frozenset[int]] = set()
    mixtures = []
    while len(mixtures) < n_mixtures:
        a, b = (int(i) for i in rng.choice(len(pool), size=2, replace=False))
        if pool[a].voice.speaker_id == pool[b].voice.speaker_id or frozenset((a, b)) in seen:
            continue
        seen.add(frozenset((a, b)))
        mixtures.append(Mixture(pool[a].split, (pool[a], pool[b]), *_levels(rng)))
    return mixtures


def _plan_train_mixed(rng: np.random.Generator, synthetic: list[_SpeakerUtterances], real: list[_SpeakerUtterances],
                      n_mixtures: int, real_fraction: float, sentences: SentenceGenerator) -> list[Mixture]:
    """Like :func:`_plan_train`, but each of the two slots is a real speaker with probability ``real_fraction``."""
    pools = [pool for pool in (synthetic, real) if pool]
    if sum(len(pool) for pool in pools) < 2:
        raise DataGenerationError("train-360 needs at least two speakers")
    mixtures = []
    for _ in range(n_mixtures):
        chosen: list[_SpeakerUtterances] = []
        while len(chosen) < 2:
            pool = real if real and (not synthetic or rng.random() < real_fraction) else synthetic
            speaker = pool[int(rng.integers(len(pool)))]
            if not chosen or speaker is not chosen[0]:
                chosen.append(speaker)
        pair = (chosen[0].new(rng, sentences), chosen[1].new(rng, sentences))
        mixtures.append(Mixture(chosen[0].split, pair, *_levels(rng)))
    return mixtures


@dataclass(frozen=True)
class _RealSpeakers:
    """The real speakers of ``--real-speech`` and their split (see :func:`fqss_plugin.data.real.split_speakers`)."""

    voices: dict[str, RealVoice]
    split: dict[str, list[str]]  # train / dev / test -> speaker names


def load_real_speakers(config: SpeechConfig) -> _RealSpeakers:
    """Scan ``config.real_speech`` and split its speakers disjointly (ids by sorted name)."""
    assert config.real_speech is not None
    recordings = scan_real_speech(config.real_speech, config.speaker_pattern)
    voices = {name: RealVoice(REAL_SPEAKER_ID_START + index, name, tuple(recordings[name]))
              for index, name in enumerate(sorted(recordings))}
    split = split_speakers(list(voices), config.seed, config.real_dev_fraction, config.real_test_fraction)
    if len(split["test"]) < 2:
        raise DataGenerationError(f"--real-speech {config.real_speech}: {len(voices)} usable speaker(s) give "
                                  f"{len(split['test'])} test speaker(s); a test-real mixture needs two "
                                  "(add speakers or raise --real-test-fraction)")
    return _RealSpeakers(voices, split)


def plan_speech(config: SpeechConfig) -> SpeechPlan:
    """Draw voices, sentences, pairs and levels for every split (deterministic in ``config.seed``).

    Without ``real_speech`` and ``augment`` the draws are exactly those of the synthetic-only
    generator.  With ``real_speech``, train-360 and dev also hold the real speakers of those
    splits (:func:`_plan_train_mixed`; dev deals its utterances over synthetic and real
    speakers alike), test and test-flite stay synthetic, and ``test-real`` mixes only the real
    test speakers.  With augmentation, every train-360 and dev mixture gets an
    augmentation seed and levels from the wider ranges of :mod:`fqss_plugin.data.augment`,
    drawn from a second generator so that the rest of the plan is unchanged.
    """
    rng = np.random.default_rng(config.seed)
    sentences = SentenceGenerator(rng)
    real = load_real_speakers(config) if config.real_speech is not None else None
    n_train, n_eval = config.train_mixtures, config.mixtures_per_eval_split
    layout = [(TRAIN, "espeak-ng", min(config.train_speakers, 2 * n_train), n_train),
              (DEV, "espeak-ng", min(config.eval_speakers, n_eval + 1), n_eval),
              (TEST, "espeak-ng", min(config.eval_speakers, n_eval + 1), n_eval)]
    if config.cross_engine:
        layout.append((CROSS, "flite", min(config.eval_speakers, n_eval + 1), n_eval))
    ids = rng.choice(np.arange(*SPEAKER_ID_RANGE), size=sum(s for _, _, s, _ in layout), replace=False)
    if real is not None:
        layout.append((TEST_REAL, "real", 0, config.real_test_mixtures or n_eval))
    real_split = {TRAIN: "train", DEV: "dev", TEST_REAL: "test"}
    voices: dict[str, list[Voice | RealVoice]] = {}
    utterances: list[Utterance] = []
    mixtures: list[Mixture] = []
    f0_checked: set[str] = set()
    start = 0
    for split, engine, n_speakers, n_mixtures in layout:
        split_ids = [int(i) for i in ids[start : start + n_speakers]]
        start += n_speakers
        speakers: list[_SpeakerUtterances] = [_SpeakerUtterances(v, int(rng.integers(*CHAPTER_ID_RANGE)), split)
                                              for v in sample_voices(rng, split_ids, engine)] if n_speakers else []
        real_speakers: list[_SpeakerUtterances] = []
        if real is not None and split in real_split:
            real_speakers = [_RealSpeakerUtterances(real.voices[name], int(rng.integers(*CHAPTER_ID_RANGE)), split)
                             for name in real.split[real_split[split]]]
        if split == TRAIN:
            split_mixtures = (_plan_train_mixed(rng, speakers, real_speakers, n_mixtures, config.real_fraction,
                                                sentences)
                              if real_speakers else _plan_train(rng, speakers, n_mixtures, sentences))
        else:
            split_mixtures = _plan_eval(rng, speakers + real_speakers, n_mixtures, sentences)
        speakers += real_speakers
        used = {u.utterance_id for m in split_mixtures for u in m.utterances}
        voices[split] = []
        for speaker in speakers:
            spoken = [u for u in speaker.made if u.utterance_id in used]
            if spoken:
                voices[split].append(speaker.voice)
                utterances += spoken
                f0_checked.update(u.utterance_id for u in spoken[:F0_UTTERANCES_PER_SPEAKER])
        mixtures += split_mixtures
    if config.augmented:
        mixtures = _with_augmentation(mixtures, config.seed)
    return SpeechPlan(voices, utterances, mixtures, f0_checked)


def _with_augmentation(mixtures: list[Mixture], seed: int) -> list[Mixture]:
    """Give the train-360 and dev mixtures an augmentation seed and wider level draws (second generator)."""
    from fqss_plugin.data.augment import AUGMENTED_NOISE_LUFS, AUGMENTED_SPEECH_LUFS

    rng = np.random.default_rng([seed, 1])
    augmented = []
    for mixture in mixtures:
        if mixture.split in AUGMENTED_SPLITS:
            speech = (float(rng.uniform(*AUGMENTED_SPEECH_LUFS)), float(rng.uniform(*AUGMENTED_SPEECH_LUFS)))
            mixture = replace(mixture, speech_lufs=speech, noise_lufs=float(rng.uniform(*AUGMENTED_NOISE_LUFS)),
                              augment_seed=int(rng.integers(2**31)))
        augmented.append(mixture)
    return augmented


def trim_silence(x: np.ndarray, sr: int) -> np.ndarray:
    """Cut leading/trailing samples below :data:`TRIM_BELOW_PEAK_DB` re peak, keeping :data:`TRIM_MARGIN_S`."""
    loud = np.nonzero(np.abs(x) > np.max(np.abs(x)) * 10 ** (TRIM_BELOW_PEAK_DB / 20))[0]
    if loud.size == 0:
        return x
    margin = int(TRIM_MARGIN_S * sr)
    return x[max(0, loud[0] - margin) : loud[-1] + margin + 1]


@dataclass(frozen=True)
class _SynthesisTask:
    utterance: Utterance
    path: Path
    espeak_data: Path | None
    measure_f0: bool


@dataclass(frozen=True)
class _SynthesisResult:
    utterance_id: str
    seconds: float
    f0_hz: float


def _synthesize(task: _SynthesisTask) -> _SynthesisResult:
    """Speak one utterance (or join a real speaker's excerpts), trim it, resample to 16 kHz, write 16-bit FLAC."""
    if task.utterance.excerpts:
        audio = render_real_utterance(task.utterance.excerpts, LIBRISPEECH_SR)
    else:
        audio, sr = task.utterance.voice.synthesize(task.utterance.text, task.espeak_data)
        audio = trim_silence(audio.astype(np.float64), sr)
        divisor = math.gcd(sr, LIBRISPEECH_SR)
        audio = resample_poly(audio, LIBRISPEECH_SR // divisor, sr // divisor)
    peak = np.max(np.abs(audio))
    if peak > 0.99:
        audio *= 0.99 / peak
    sf.write(task.path, audio, LIBRISPEECH_SR, format="FLAC", subtype="PCM_16")
    f0 = median_f0(audio, LIBRISPEECH_SR) if task.measure_f0 else float("nan")
    return _SynthesisResult(task.utterance.utterance_id, len(audio) / LIBRISPEECH_SR, f0)


@dataclass(frozen=True)
class _MixTask:
    mixture: Mixture
    librispeech: Path
    librimix: Path
    sample_rates: tuple[int, ...]
    modes: tuple[str, ...]
    mix_types: tuple[str, ...]


def _mix(task: _MixTask) -> list[MixtureRows]:
    """Read the two utterances, draw the noise, and write the mixture at every rate and mode."""
    mixture = task.mixture
    utterances = [sf.read(task.librispeech / u.relative_path, dtype="float64")[0] for u in mixture.utterances]
    if mixture.augment_seed is not None:
        from fqss_plugin.data.augment import augment_voices

        utterances = augment_voices(utterances, LIBRISPEECH_SR, mixture.augment_seed)
    noise = synthesize_noise(mixture.noise_seed, max(len(u) for u in utterances), LIBRISPEECH_SR)
    gains = librimix_gains(utterances, noise, mixture.speech_lufs, mixture.noise_lufs)
    rows = []
    for sample_rate in task.sample_rates:
        for mode in task.modes:
            sources = render_sources(utterances, noise, gains, sample_rate, mode)
            split_dir = mode_dir(task.librimix, sample_rate, mode) / mixture.split
            rows += write_mixture(split_dir, mixture.mixture_id, sources, sample_rate, mode, mixture.split,
                                  task.mix_types)
    return rows


def _write_librispeech_text(root: Path, plan: SpeechPlan, results: dict[str, _SynthesisResult]) -> None:
    """``<spk>-<chapter>.trans.txt`` per chapter and ``SPEAKERS.TXT`` (LibriSpeech's formats)."""
    chapters: dict[Path, list[Utterance]] = {}
    for utterance in plan.utterances:
        if utterance.excerpts:  # real speech: no transcript
            continue
        chapters.setdefault(root / utterance.relative_path.parent, []).append(utterance)
    for folder, utterances in chapters.items():
        lines = sorted(f"{u.utterance_id} {transcript(u.text)}" for u in utterances)
        (folder / f"{folder.parent.name}-{folder.name}.trans.txt").write_text("\n".join(lines) + "\n")
    minutes: dict[int, float] = {}
    for utterance in plan.utterances:
        speaker = utterance.voice.speaker_id
        minutes[speaker] = minutes.get(speaker, 0.0) + results[utterance.utterance_id].seconds / 60
    lines = ["; Synthetic speakers of the fqss embedded data (synthesis parameters: ../voices.csv)",
             ";ID  |SEX| SUBSET           |MINUTES| NAME"]
    for split, voices in plan.voices.items():
        for v in voices:
            lines.append(f"{v.speaker_id:<5}| {v.sex} | {LIBRISPEECH_SUBSET[split]:<17}| "
                         f"{minutes.get(v.speaker_id, 0.0):5.2f} | {v.describe()}")
    (root / "SPEAKERS.TXT").write_text("\n".join(lines) + "\n")


def _voice_table(plan: SpeechPlan, results: dict[str, _SynthesisResult]) -> list[dict[str, object]]:
    """One row per voice: parameters, utterance count, minutes and measured median f0."""
    per_speaker: dict[int, list[_SynthesisResult]] = {}
    for utterance in plan.utterances:
        per_speaker.setdefault(utterance.voice.speaker_id, []).append(results[utterance.utterance_id])
    rows = []
    for split, voices in plan.voices.items():
        for v in voices:
            measured = [r.f0_hz for r in per_speaker.get(v.speaker_id, []) if np.isfinite(r.f0_hz)]
            rows.append({
                "speaker_id": v.speaker_id, "split": split, "sex": v.sex, "engine": v.engine, "base": v.base,
                "f0_target_hz": round(v.f0_target_hz, 1),
                "f0_measured_hz": round(float(np.median(measured)), 1) if measured else float("nan"),
                "f0_range_hz": round(v.f0_range_hz, 1), "rate_wpm": round(v.rate_wpm, 1),
                "formant_scale": " ".join(f"{s:.3f}" for s in v.formant_scale), "roughness": v.roughness,
                "utterances": len(per_speaker.get(v.speaker_id, [])),
                "minutes": round(sum(r.seconds for r in per_speaker.get(v.speaker_id, [])) / 60, 2),
            })
    return rows


def f0_statistics(voice_rows: list[dict[str, object]], mixtures: list[Mixture]) -> dict[str, object]:
    """Per-sex summary of the voices' measured median f0 and the f0 gap within mixture pairs (semitones)."""
    f0 = {int(r["speaker_id"]): float(r["f0_measured_hz"]) for r in voice_rows}
    stats: dict[str, object] = {}
    for sex in ("F", "M"):
        values = np.array([float(r["f0_measured_hz"]) for r in voice_rows if r["sex"] == sex])
        values = values[np.isfinite(values)]
        if values.size:
            stats[sex] = {"voices": int(values.size), "min_hz": round(float(values.min()), 1),
                          "median_hz": round(float(np.median(values)), 1), "max_hz": round(float(values.max()), 1)}
    gaps = np.array([12 * abs(np.log2(f0[m.utterances[0].voice.speaker_id] / f0[m.utterances[1].voice.speaker_id]))
                     for m in mixtures])
    gaps = gaps[np.isfinite(gaps)]
    if gaps.size:
        stats["pair_gap_semitones"] = {"median": round(float(np.median(gaps)), 2),
                                       "fraction_below_1": round(float(np.mean(gaps < 1)), 3)}
    return stats


def generate_speech(config: SpeechConfig) -> dict[str, object]:
    """Generate the synthetic Libri2Mix under ``config.out``; return (and save) the summary."""
    config.validate()
    require_tools("espeak-ng", *(("flite",) if config.cross_engine else ()))
    if config.augmented:
        from fqss_plugin.data.augment import require_room_simulator

        require_room_simulator()
    plan = plan_speech(config)  # reads --real-speech: its errors come before anything is written
    out = config.out.resolve()
    prepare_output_dir(out, GENERATED, config.overwrite)
    librispeech, librimix = out / "LibriSpeech", out / "Libri2Mix"

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fqss-espeak-") as scratch:
        espeak_data = write_espeak_data([v for vs in plan.voices.values() for v in vs], Path(scratch))
        tasks = []
        for utterance in plan.utterances:
            path = librispeech / utterance.relative_path
            path.parent.mkdir(parents=True, exist_ok=True)
            tasks.append(_SynthesisTask(utterance, path, espeak_data.get(utterance.voice.speaker_id),
                                        utterance.utterance_id in plan.f0_checked))
        synthesized = parallel_map(_synthesize, tasks, config.jobs, "synthesize utterances", config.progress)
    synthesis_s = time.perf_counter() - start
    results = {r.utterance_id: r for r in synthesized}
    _write_librispeech_text(librispeech, plan, results)

    start = time.perf_counter()
    for sample_rate in config.sample_rates:
        for mode in config.modes:
            for split in plan.voices:
                make_split_dirs(librimix, sample_rate, mode, split, config.mix_types)
    mix_tasks = [_MixTask(m, librispeech, librimix, config.sample_rates, config.modes, config.mix_types)
                 for m in plan.mixtures]
    rows = [row for rows in parallel_map(_mix, mix_tasks, config.jobs, "mix", config.progress) for row in rows]
    mixing_s = time.perf_counter() - start
    write_metadata(librimix, rows)
    create_local_metadata(librimix, out / "data")
    _write_test_annotations(out / "data" / "test_annotations.csv", plan)
    voice_rows = _voice_table(plan, results)
    _write_rows(out / "voices.csv", voice_rows)
    if config.real_speech is not None:
        _write_rows(out / "real_speakers.csv", _real_speaker_table(plan, results))

    summary = _summary(config, plan, rows, synthesized, synthesis_s, mixing_s, voice_rows, out)
    (out / "speech_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _real_speaker_table(plan: SpeechPlan, results: dict[str, _SynthesisResult]) -> list[dict[str, object]]:
    """One row per real speaker used: id, folder name, source group, split, recordings, minutes."""
    used: dict[int, list[_SynthesisResult]] = {}
    for utterance in plan.utterances:
        if utterance.excerpts:
            used.setdefault(utterance.voice.speaker_id, []).append(results[utterance.utterance_id])
    rows = []
    for split, voices in plan.voices.items():
        for v in voices:
            if isinstance(v, RealVoice):
                rows.append({"speaker_id": v.speaker_id, "name": v.name, "source": speaker_group(v.name) or "-",
                             "split": split, "recordings": len(v.recordings),
                             "minutes_available": round(sum(r.seconds for r in v.recordings) / 60, 2),
                             "utterances": len(used.get(v.speaker_id, [])),
                             "minutes_used": round(sum(r.seconds for r in used.get(v.speaker_id, [])) / 60, 2)})
    return rows


def _write_test_annotations(path: Path, plan: SpeechPlan) -> None:
    """``utt_id,text`` for the test utterances (what Asteroid's ``local/get_text.py`` writes)."""
    rows = [{"utt_id": u.utterance_id, "text": transcript(u.text)} for u in plan.utterances
            if u.split in (TEST, CROSS) and not u.excerpts]
    _write_rows(path, rows, header=("utt_id", "text"))


def _write_rows(path: Path, rows: list[dict[str, object]], header: tuple[str, ...] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header or rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _summary(config: SpeechConfig, plan: SpeechPlan, rows: list[MixtureRows], synthesized: list[_SynthesisResult],
             synthesis_s: float, mixing_s: float, voice_rows: list[dict[str, object]], out: Path) -> dict[str, object]:
    """Counts, audio hours, speeds (per minute of wall time) and disk use per hour of mixtures.

    Split hours are those of the first rate and mode; disk use is per rate/mode
    folder (all sources and mixture types) divided by that folder's hours of mixtures.
    """
    def mixture_seconds(sample_rate: int, mode: str, split: str | None = None) -> list[float]:
        return [int(r.mixture["length"]) / sample_rate for r in rows
                if (r.sample_rate, r.mode, r.mix_type) == (sample_rate, mode, config.mix_types[0])
                and split in (None, r.split)]

    first = (config.sample_rates[0], config.modes[0])
    hours = {split: {"mixtures": len(mixture_seconds(*first, split)),
                     "hours": round(sum(mixture_seconds(*first, split)) / 3600, 4)} for split in plan.voices}
    disk = {}
    for sample_rate in config.sample_rates:
        for mode in config.modes:
            size_mb = directory_bytes(mode_dir(out / "Libri2Mix", sample_rate, mode)) / 1e6
            folder_hours = sum(mixture_seconds(sample_rate, mode)) / 3600
            disk[f"{wav_dir_name(sample_rate)}/{mode}"] = {"MB": round(size_mb, 1),
                                                           "MB_per_hour_of_mixtures": round(size_mb / folder_hours, 1)}
    speech_hours = sum(r.seconds for r in synthesized) / 3600
    librispeech_mb = directory_bytes(out / "LibriSpeech") / 1e6
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "splits": hours,
        "utterances": len(synthesized),
        "utterance_seconds_mean": round(speech_hours * 3600 / max(1, len(synthesized)), 2),
        "utterances_per_minute": round(len(synthesized) / synthesis_s * 60, 1),
        "mixtures_per_minute": round(len(plan.mixtures) / mixing_s * 60, 1),
        "synthesis_seconds": round(synthesis_s, 1),
        "mixing_seconds": round(mixing_s, 1),
        "librimix_disk": disk,
        "librispeech_disk": {"MB": round(librispeech_mb, 1),
                             "MB_per_hour_of_utterances": round(librispeech_mb / max(speech_hours, 1e-9), 1)},
        "f0": f0_statistics(voice_rows, plan.mixtures),
        "augmented_splits": list(AUGMENTED_SPLITS) if config.augmented else [],
        "real_speakers": {split: sorted(v.name for v in voices if isinstance(v, RealVoice))
                          for split, voices in plan.voices.items()
                          if any(isinstance(v, RealVoice) for v in voices)},
    }
