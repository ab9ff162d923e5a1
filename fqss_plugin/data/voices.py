"""The synthetic speakers: a pool of distinct TTS voices, and one call to synthesize with each.

Two engines give two disjoint voice families:

* **espeak-ng** (train, dev, test).  Each speaker is a base English voice
  (:data:`ESPEAK_BASES`, accents that honour variants; ``en-gb`` silently ignores
  them in espeak-ng 1.51) plus a generated *variant file* that sets

  - ``pitch lo hi``: espeak-ng 1.51 reads the two numbers as the bottom and the
    top of the intonation range (not base and width; ``hi < lo`` crashes it); over many sentences the
    median f0 measures ``lo + 0.66 (hi - lo)`` (+-4 % for widths 30-100 Hz), so a
    target median ``f0`` with width ``w`` is written as ``lo = f0 - 0.66 w``;
  - ``formant k freq height width`` for k = 1..5: the formant frequencies are
    scaled by a per-speaker vocal-tract factor (shorter tract, higher formants
    for female voices) with a small per-formant jitter;
  - ``roughness``: a little creak on some voices;

  and a speaking rate (``-s`` words per minute).  espeak-ng lists at most 349
  voice files, so the variants live in private (symlinked) copies of ``espeak-ng-data``
  (:func:`write_espeak_data`) holding only the English language files and at
  most :data:`VARIANTS_PER_DATA_DIR` variants each, selected per call with
  ``ESPEAK_DATA_PATH``.
* **flite** (the cross-engine ``test-flite`` split): ``slt`` (female) or
  ``awb``/``kal16`` (male) with a per-speaker target f0
  (``int_f0_target_mean``/``int_f0_target_stddev``) and rate
  (``duration_stretch``).  ``rms`` ignores the f0 target and is not used.

Target median f0 is drawn log-uniformly in :data:`F0_RANGE_HZ` per sex
(male 85-150 Hz, female 165-255 Hz: typical adult speaking f0), so "female"
voices really are higher; the generator measures and reports the f0 it got.
"""
from __future__ import annotations

import io
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from fqss_plugin.data.errors import DataGenerationError
from fqss_plugin.data.tools import run_tool

ESPEAK_BASES = (
    "en", "en-us", "en-us-nyc", "en-029", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
)
FLITE_BASES = {"F": ("slt",), "M": ("awb", "kal16")}
F0_RANGE_HZ = {"M": (85.0, 150.0), "F": (165.0, 255.0)}
F0_WIDTH_HZ = {"M": (35.0, 75.0), "F": (45.0, 95.0)}
VOCAL_TRACT_SCALE = {"M": (0.92, 1.04), "F": (1.08, 1.20)}
RATE_WPM = (145.0, 195.0)
MEDIAN_FRACTION_OF_RANGE = 0.66
LOWEST_PITCH_HZ = 50
FLITE_NATIVE_WPM = 175.0
VARIANTS_PER_DATA_DIR = 300


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker.

    ``formant_scale`` (espeak-ng only) holds the frequency factors of formants 1-5;
    ``f0_range_hz`` is the intonation width (espeak-ng ``hi - lo``; flite uses a
    target standard deviation of a quarter of it).
    """

    speaker_id: int
    sex: str
    engine: str
    base: str
    f0_target_hz: float
    f0_range_hz: float
    rate_wpm: float
    formant_scale: tuple[float, ...] = ()
    roughness: int = 0

    @property
    def variant_name(self) -> str:
        return f"fqss{self.speaker_id}"

    def variant_file(self) -> str:
        """The espeak-ng variant file text for this voice."""
        lo = round(self.f0_target_hz - MEDIAN_FRACTION_OF_RANGE * self.f0_range_hz)
        hi = lo + round(self.f0_range_hz)
        lines = [
            "language variant",
            f"name {self.variant_name}",
            f"gender {'female' if self.sex == 'F' else 'male'}",
            f"pitch {lo} {hi}",
        ]
        lines += [f"formant {k} {round(100 * s)} 100 100" for k, s in enumerate(self.formant_scale, start=1)]
        lines.append(f"roughness {self.roughness}")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """A one-line description (the NAME column of SPEAKERS.TXT)."""
        return (f"{self.engine} {self.base} f0~{self.f0_target_hz:.0f}Hz range {self.f0_range_hz:.0f}Hz "
                f"rate {self.rate_wpm:.0f}wpm")

    def synthesize(self, text: str, espeak_data: Path | None) -> tuple[np.ndarray, int]:
        """Speak ``text``; return (mono float32 waveform, sample rate of the engine)."""
        if self.engine == "espeak-ng":
            if espeak_data is None:
                raise ValueError("espeak-ng voices need the private data directory from write_espeak_data")
            command = ["espeak-ng", "-v", f"{self.base}+{self.variant_name}", "-s", str(round(self.rate_wpm)),
                       "--stdout", text]
            wav = run_tool(command, env={"ESPEAK_DATA_PATH": str(espeak_data)})
        else:
            command = ["flite", "-voice", self.base,
                       "--setf", f"int_f0_target_mean={self.f0_target_hz:.1f}",
                       "--setf", f"int_f0_target_stddev={self.f0_range_hz / 4:.1f}",
                       "--setf", f"duration_stretch={FLITE_NATIVE_WPM / self.rate_wpm:.3f}",
                       "-t", text, "-o", "/dev/stdout"]
            wav = run_tool(command)
        audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
        return audio, sr


def sample_voices(rng: np.random.Generator, speaker_ids: list[int], engine: str) -> list[Voice]:
    """One voice per speaker id, alternating sex (F, M, F, ...) so every set is balanced."""
    voices = []
    for index, speaker_id in enumerate(speaker_ids):
        sex = "F" if index % 2 == 0 else "M"
        f0_lo, f0_hi = F0_RANGE_HZ[sex]
        f0 = float(np.exp(rng.uniform(np.log(f0_lo), np.log(f0_hi))))
        # narrower range for the lowest voices, so that the bottom of the range stays >= LOWEST_PITCH_HZ
        width = min(float(rng.uniform(*F0_WIDTH_HZ[sex])), (f0 - LOWEST_PITCH_HZ) / MEDIAN_FRACTION_OF_RANGE)
        rate = float(rng.uniform(*RATE_WPM))
        if engine == "espeak-ng":
            tract = rng.uniform(*VOCAL_TRACT_SCALE[sex])
            formants = tuple(float(tract * rng.uniform(0.97, 1.03)) for _ in range(5))
            base = ESPEAK_BASES[int(rng.integers(len(ESPEAK_BASES)))]
            voices.append(Voice(speaker_id, sex, engine, base, f0, width, rate, formants, int(rng.integers(0, 4))))
        elif engine == "flite":
            bases = FLITE_BASES[sex]
            voices.append(Voice(speaker_id, sex, engine, bases[int(rng.integers(len(bases)))], f0, width, rate))
        else:
            raise ValueError(f"unknown TTS engine {engine!r}")
    return voices


def espeak_system_data() -> Path:
    """The installed ``espeak-ng-data`` directory (from ``espeak-ng --version``)."""
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False).stdout
    if "Data at:" not in out:
        raise DataGenerationError(f"cannot find espeak-ng's data directory in `espeak-ng --version`: {out!r}")
    return Path(out.split("Data at:", 1)[1].strip())


def write_espeak_data(voices: list[Voice], root: Path) -> dict[int, Path]:
    """Private ``espeak-ng-data`` copies holding the variant files of ``voices``.

    Each copy under ``root`` symlinks the system data, keeps only the English
    language files (``lang/gmw/en*``) and holds up to :data:`VARIANTS_PER_DATA_DIR`
    variants in ``voices/!v``, which stays below espeak-ng's 349-voice listing limit.
    Returns ``speaker_id -> data directory`` (the value for ``ESPEAK_DATA_PATH``).
    """
    system = espeak_system_data()
    english = sorted((system / "lang" / "gmw").glob("en*"))
    data_dirs: dict[int, Path] = {}
    espeak_voices = [v for v in voices if v.engine == "espeak-ng"]
    for start in range(0, len(espeak_voices), VARIANTS_PER_DATA_DIR):
        data = root / f"espeak-ng-data-{start // VARIANTS_PER_DATA_DIR}"
        (data / "lang" / "gmw").mkdir(parents=True)
        (data / "voices" / "!v").mkdir(parents=True)
        for entry in system.iterdir():
            if entry.name not in ("lang", "voices"):
                os.symlink(entry, data / entry.name)
        for language in english:
            os.symlink(language, data / "lang" / "gmw" / language.name)
        for voice in espeak_voices[start : start + VARIANTS_PER_DATA_DIR]:
            (data / "voices" / "!v" / voice.variant_name).write_text(voice.variant_file())
            data_dirs[voice.speaker_id] = data
    return data_dirs
