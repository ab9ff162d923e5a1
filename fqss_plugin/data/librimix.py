"""The LibriMix on-disk format: mixing rule, file layout, metadata CSVs, and the toolkits' manifests.

Layout written (identical to LibriMix's ``create_librimix_from_metadata.py``)::

    <root>/Libri2Mix/wav{8k,16k}/{min,max}/
        {train-360,dev,test,...}/{s1,s2,noise,mix_clean,mix_both,mix_single}/<id1>_<id2>.wav
        metadata/mixture_<split>_<type>.csv   mixture_ID,mixture_path,source_1_path,source_2_path[,noise_path],length
        metadata/metrics_<split>_<type>.csv   mixture_ID,source_1_SNR,source_2_SNR[,noise_SNR]

(``mix_single`` rows have ``source_1_path,noise_path`` and ``source_1_SNR,noise_SNR``.)
Paths are absolute, ``length`` is in samples, wavs are mono 16-bit PCM.

**Mixing rule** (LibriMix's, at the 16 kHz LibriSpeech rate, once per mixture for
every output rate and mode): the two utterances are zero-padded to the longer
one and the noise cut to that length; each source ``x_i`` gets gain
``g_i = 10 ** ((T_i - L(x_i)) / 20)`` with ``L`` the BS.1770 loudness
(:mod:`fqss_plugin.data.loudness`) and targets ``T_speech ~ U(-33, -25)`` LUFS,
``T_noise ~ U(-38, -30)`` LUFS; a source whose peak would reach 1 gets
``g_i = 0.9 / max|x_i|`` instead; if the sum of all three scaled sources peaks
above 0.9, every gain is multiplied by ``0.9 / peak``.  Then each scaled source
is resampled (``scipy.signal.resample_poly``) and cut to the shortest (``min``)
or padded to the longest (``max``) source.

**Sample-exact sums**: sources are quantized to 16-bit integers ``q_i`` first and
every mixture is the integer sum (``mix_clean = q1 + q2``, ``mix_both = q1 + q2 +
qn``, ``mix_single = q1 + qn``), so reading with ``soundfile`` (``q / 32768``, exact
in float32) gives ``mixture == s1 + s2 (+ noise)`` bit for bit.  If a sum would
leave the 16-bit range (only possible through resampling overshoot), all
sources are first scaled down together.
"""
from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from fqss_plugin.data.errors import DataGenerationError
from fqss_plugin.data.loudness import gain_for_loudness

LIBRISPEECH_SR = 16000
SPEECH_LUFS = (-33.0, -25.0)
NOISE_LUFS = (-38.0, -30.0)
MAX_AMP = 0.9
INT16_SCALE = 32768
MIX_TYPES = ("mix_clean", "mix_both", "mix_single")
MODES = ("min", "max")
SAMPLE_RATES = (8000, 16000)
SPEECHBRAIN_COLUMNS = (
    "ID", "duration",
    "mix_wav", "mix_wav_format", "mix_wav_opts",
    "s1_wav", "s1_wav_format", "s1_wav_opts",
    "s2_wav", "s2_wav_format", "s2_wav_opts",
    "noise_wav", "noise_wav_format", "noise_wav_opts",
)


def wav_dir_name(sample_rate: int) -> str:
    """``8000 -> "wav8k"`` (LibriMix's rate folder)."""
    return f"wav{sample_rate // 1000}k"


def mode_dir(librimix_root: Path, sample_rate: int, mode: str) -> Path:
    """``<root>/Libri2Mix/wav8k/min``: the folder holding the splits and ``metadata/``."""
    return librimix_root / wav_dir_name(sample_rate) / mode


def mixed_sources(mix_type: str) -> tuple[str, ...]:
    """Which of ``s1, s2, noise`` a LibriMix mixture type sums."""
    return {"mix_clean": ("s1", "s2"), "mix_both": ("s1", "s2", "noise"), "mix_single": ("s1", "noise")}[mix_type]


def librimix_gains(utterances: list[np.ndarray], noise: np.ndarray, speech_lufs: tuple[float, float],
                   noise_lufs: float) -> list[float]:
    """Gains ``[g_s1, g_s2, g_noise]`` by the LibriMix rule (module docstring), sources at 16 kHz."""
    length = max(len(u) for u in utterances)
    padded = [np.pad(u, (0, length - len(u))) for u in utterances] + [noise[:length]]
    targets = [*speech_lufs, noise_lufs]
    gains = []
    for x, target in zip(padded, targets):
        gain = gain_for_loudness(x, LIBRISPEECH_SR, target)
        peak = float(np.max(np.abs(x)))
        if gain * peak >= 1.0:
            gain = MAX_AMP / peak
        gains.append(gain)
    mix_peak = float(np.max(np.abs(sum(g * x for g, x in zip(gains, padded)))))
    if mix_peak > MAX_AMP:
        gains = [g * MAX_AMP / mix_peak for g in gains]
    return gains


def render_sources(utterances: list[np.ndarray], noise: np.ndarray, gains: list[float], sample_rate: int,
                   mode: str) -> dict[str, np.ndarray]:
    """Scaled, resampled, length-fitted, 16-bit sources ``{"s1", "s2", "noise"}`` (int16 arrays)."""
    length = max(len(u) for u in utterances)
    sources = [g * x for g, x in zip(gains, [*utterances, noise[:length]])]
    if sample_rate != LIBRISPEECH_SR:
        divisor = np.gcd(sample_rate, LIBRISPEECH_SR)
        sources = [resample_poly(x, sample_rate // divisor, LIBRISPEECH_SR // divisor) for x in sources]
    if mode == "min":
        target = min(len(x) for x in sources)
        sources = [x[:target] for x in sources]
    else:
        target = max(len(x) for x in sources)
        sources = [np.pad(x, (0, target - len(x))) for x in sources]
    peak = max(float(np.max(np.abs(sum(sources[i] for i in idx)))) for idx in ((0, 1), (0, 1, 2), (0, 2), (0,), (1,), (2,)))
    limit = (INT16_SCALE - 2) / INT16_SCALE
    if peak > limit:
        sources = [x * limit / peak for x in sources]
    quantized = [np.clip(np.round(x * INT16_SCALE), -INT16_SCALE, INT16_SCALE - 1).astype(np.int16) for x in sources]
    return dict(zip(("s1", "s2", "noise"), quantized))


def snr_db(signal: np.ndarray, rest: np.ndarray) -> float:
    """LibriMix's metrics SNR: ``10 log10(mean(signal^2) / (mean(rest^2) + 1e-10) + 1e-10)``."""
    return float(10 * np.log10(np.mean(signal**2) / (np.mean(rest**2) + 1e-10) + 1e-10))


@dataclass(frozen=True)
class MixtureRows:
    """The metadata rows one mixture contributes to ``mixture_*.csv`` / ``metrics_*.csv`` of one type."""

    sample_rate: int
    mode: str
    split: str
    mix_type: str
    mixture: dict[str, str | int]
    metrics: dict[str, str | float]


def write_mixture(split_dir: Path, mixture_id: str, sources: dict[str, np.ndarray], sample_rate: int, mode: str,
                  split: str, mix_types: tuple[str, ...]) -> list[MixtureRows]:
    """Write ``s1``/``s2`` (and ``noise`` unless only ``mix_clean``) plus each mixture type; return their rows."""
    filename = f"{mixture_id}.wav"
    needs_noise = any("noise" in mixed_sources(t) for t in mix_types)
    paths: dict[str, str] = {}
    for name in ("s1", "s2", "noise") if needs_noise else ("s1", "s2"):
        path = split_dir / name / filename
        sf.write(path, sources[name], sample_rate, subtype="PCM_16")
        paths[name] = str(path.resolve())
    rows = []
    for mix_type in mix_types:
        parts = mixed_sources(mix_type)
        mixture = np.sum([sources[p].astype(np.int32) for p in parts], axis=0).astype(np.int16)
        path = split_dir / mix_type / filename
        sf.write(path, mixture, sample_rate, subtype="PCM_16")
        column = {"s1": "source_1", "s2": "source_2", "noise": "noise"}
        mixture_row: dict[str, str | int] = {"mixture_ID": mixture_id, "mixture_path": str(path.resolve())}
        mixture_row.update({f"{column[p]}_path": paths[p] for p in parts})
        mixture_row["length"] = len(mixture)
        mix_float = mixture.astype(np.float64) / INT16_SCALE
        metrics_row: dict[str, str | float] = {"mixture_ID": mixture_id}
        for p in parts:
            source = sources[p].astype(np.float64) / INT16_SCALE
            metrics_row[f"{column[p]}_SNR"] = snr_db(source, mix_float - source)
        rows.append(MixtureRows(sample_rate, mode, split, mix_type, mixture_row, metrics_row))
    return rows


def make_split_dirs(librimix_root: Path, sample_rate: int, mode: str, split: str, mix_types: tuple[str, ...]) -> Path:
    """Create ``<split>/{s1,s2[,noise],<types>}`` under the rate/mode folder; return the split folder."""
    split_dir = mode_dir(librimix_root, sample_rate, mode) / split
    needs_noise = any("noise" in mixed_sources(t) for t in mix_types)
    for name in ("s1", "s2", *(("noise",) if needs_noise else ()), *mix_types):
        (split_dir / name).mkdir(parents=True, exist_ok=True)
    return split_dir


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_metadata(librimix_root: Path, rows: list[MixtureRows]) -> list[Path]:
    """Write ``metadata/{mixture,metrics}_<split>_<type>.csv`` for every (rate, mode, split, type) in ``rows``."""
    groups: dict[tuple[int, str, str, str], list[MixtureRows]] = {}
    for row in rows:
        groups.setdefault((row.sample_rate, row.mode, row.split, row.mix_type), []).append(row)
    written = []
    for (sample_rate, mode, split, mix_type), group in groups.items():
        metadata = mode_dir(librimix_root, sample_rate, mode) / "metadata"
        for kind in ("mixture", "metrics"):
            path = metadata / f"{kind}_{split}_{mix_type}.csv"
            _write_csv(path, [getattr(r, kind) for r in group])
            written.append(path)
    return written


def create_local_metadata(librimix_root: Path, local_data: Path) -> list[Path]:
    """Asteroid's ``egs/librimix/*/local/create_local_metadata.py``, as a function.

    Copies every ``<root>/wav*/<mode>/metadata/mix*.csv`` to
    ``<local_data>/wav*/<mode>/<split>/`` (``split`` = second ``_`` field of the
    file name): the ``--train_dir``/``--valid_dir``/``--test_dir`` folders that
    ``asteroid.data.LibriMix`` reads.  Returns the copied files.
    """
    copied = []
    for metadata in sorted(librimix_root.glob("wav*/*/metadata")):
        for csv_file in sorted(metadata.glob("mix*.csv")):
            split = csv_file.name.split("_")[1]
            target = local_data / metadata.parent.relative_to(librimix_root) / split
            target.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copy(csv_file, target)))
    return copied


def merge_train_metadata(out: Path, base: Path, extras: list[Path], split: str = "train-360") -> list[Path]:
    """Asteroid metadata whose ``split`` lists the mixtures of ``base`` and of every ``extras`` root.

    Each argument is a ``data/`` folder as :func:`create_local_metadata` writes it
    (``wav*/<mode>/<split>/mixture_<split>_*.csv``, absolute wav paths). A ``split`` CSV that every
    extra also has (same header required) is written with their rows appended; one that some extra
    lacks (say ``mix_both`` when an extra was made with ``--types mix_clean``) is left out. Every
    other split (dev, test) is copied from ``base``, so a model trained on the merged split is
    validated and tested exactly as one trained on ``base``. Returns the written files.
    """
    base, out = Path(base), Path(out)
    for root in (base, *map(Path, extras)):
        if not any(root.glob(f"wav*/*/{split}/mixture_{split}_*.csv")):
            raise DataGenerationError(f"merge: {root} has no wav*/<mode>/{split}/mixture_{split}_*.csv (pass the "
                                      f"data/ folder that `fqss make-data speech` wrote)")
    written = []
    for csv_file in sorted(base.glob("wav*/*/*/mixture_*.csv")):
        relative = csv_file.relative_to(base)
        lines = csv_file.read_bytes().splitlines(keepends=True)     # byte for byte (csv: CRLF)
        if relative.parent.name == split:
            others = [Path(extra) / relative for extra in extras]
            if not all(other.is_file() for other in others):
                continue
            for other in others:
                extra_lines = other.read_bytes().splitlines(keepends=True)
                if [line.rstrip() for line in extra_lines[:1]] != [line.rstrip() for line in lines[:1]]:
                    raise DataGenerationError(f"merge: {other} has the columns {extra_lines[0].decode().strip()!r}, "
                                              f"{csv_file} has {lines[0].decode().strip()!r}")
                lines += extra_lines[1:]
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"".join(lines))
        written.append(target)
    if not any(path.parent.name == split for path in written):
        raise DataGenerationError(f"merge: no {split} metadata file is in {base} and in every extra")
    return written


def prepare_librimix_csv(datapath: str | os.PathLike, savepath: str | os.PathLike, fs: int = 8000,
                         mode: str = "min", addnoise: bool = False,
                         splits: tuple[str, ...] = ("train-360", "dev", "test")) -> list[Path]:
    """SpeechBrain's LibriMix manifests (``recipes/LibriMix/prepare_data.py``) for any rate and mode.

    ``datapath`` is the ``Libri2Mix`` folder.  For each split, lists
    ``wav{8,16}k/<mode>/<split>/mix_clean`` (``mix_both`` with ``addnoise``) and writes
    ``<savepath>/libri2mix_<split>.csv`` with SpeechBrain's columns
    (:data:`SPEECHBRAIN_COLUMNS`): ``ID`` = row index, ``duration`` = 1.0, absolute
    wav paths with format ``wav`` and empty options; s1/s2/noise share the
    mixture's file name.  Unlike the recipe (which hard-codes ``wav8k/min`` and
    ``os.listdir`` order), rows are sorted by file name.  Returns the CSV paths.
    """
    root = Path(datapath).resolve()
    mix_dir_name = "mix_both" if addnoise else "mix_clean"
    written = []
    for split in splits:
        split_dir = mode_dir(root, fs, mode) / split
        mix_dir = split_dir / mix_dir_name
        if not mix_dir.is_dir():
            raise DataGenerationError(f"prepare_librimix_csv: {mix_dir} does not exist (datapath must be the "
                                      f"Libri2Mix folder holding {wav_dir_name(fs)}/{mode}/{split})")
        rows = []
        for index, wav in enumerate(sorted(p.name for p in mix_dir.glob("*.wav"))):
            row: dict[str, object] = {"ID": index, "duration": 1.0}
            for key, folder in (("mix", mix_dir_name), ("s1", "s1"), ("s2", "s2"), ("noise", "noise")):
                row[f"{key}_wav"] = str(split_dir / folder / wav)
                row[f"{key}_wav_format"] = "wav"
                row[f"{key}_wav_opts"] = None
            rows.append(row)
        path = Path(savepath) / f"libri2mix_{split}.csv"
        Path(savepath).mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=SPEECHBRAIN_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        written.append(path)
    return written
