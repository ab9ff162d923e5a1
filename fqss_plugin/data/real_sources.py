"""Extract real recorded speech from public sources into ``<out>/<source>/<speaker>/<name>.wav``.

``fqss make-data real-sources --out DIR SOURCE [SOURCE ...]`` (:func:`extract_real_sources`)
reads each SOURCE, recognises what it is, and writes mono 16-bit wavs at the
recording's own rate (capped at 16 kHz, resampled with
``torchaudio.functional.resample`` above it) in the layout that
``fqss make-data speech --real-speech DIR`` reads (:mod:`fqss_plugin.data.real`):

* a bare git directory of ``Jakobovski/free-spoken-digit-dataset`` (``recordings/<digit>_<name>_<n>.wav``,
  6 speakers, CC BY-SA 4.0) -> ``fsdd/<name>/``;
* a bare git directory of ``resemble-ai/Resemblyzer`` (``audio_data/librispeech_*``: LibriSpeech
  excerpts, CC BY 4.0, 1 utterance of each of 251 train-clean-100 speakers and 10 of each of 10
  test-other speakers) -> ``librispeech/<speaker id>/``; its other audio (interviews) is not used;
* Debian packages (a ``.deb`` file, or a folder holding an unpacked or installed tree, e.g. ``/``):
  ``asterisk-core-sounds-*-wav`` and ``asterisk-prompt-it-menardi-wav`` (telephone prompts,
  CC BY-SA 3.0) -> ``asterisk/<voice>/`` (the voice is the last field of the folder name, so
  ``en_US_f_Allison`` and ``es_MX_f_Allison`` are one speaker); ``ktuberling-data`` and
  ``klettres-data`` (KDE word and syllable recordings, GPL-2+) -> ``kde/<language>/`` (one speaker
  assumed per language; ``sr@latin``/``pt_BR``-style variants are merged into their base language
  so that a person who recorded two variants cannot land in two splits).

Identical files (same bytes) are written once. LibriSpeech speakers whose audio is also in
repositories an external check set is built from are skipped (:data:`EXCLUDED_SPEAKERS`).
A git directory is read with ``git archive``; a ``.deb`` is unpacked with ``dpkg-deb -x``.
``<out>/real_sources.csv`` lists every speaker with its file count, seconds, rate and licence.
"""
from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from fqss_plugin.data.errors import DataGenerationError
from fqss_plugin.data.output import prepare_output_dir

MAX_RATE = 16000
MIN_SECONDS = 0.15
READABLE = (".wav", ".flac", ".ogg")
LICENCES = {
    "fsdd": "CC BY-SA 4.0 (Free Spoken Digit Dataset, Jakobovski/free-spoken-digit-dataset)",
    "librispeech": "CC BY 4.0 (LibriSpeech, via resemble-ai/Resemblyzer audio_data, Apache-2.0 repo)",
    "asterisk": "CC BY-SA 3.0 (Debian asterisk-core-sounds-*-wav, asterisk-prompt-it-menardi-wav)",
    "kde": "GPL-2+ (Debian ktuberling-data, klettres-data)",
}
# LibriSpeech speakers whose recordings are also in librosa/data (198, 3436, 5703) or in
# speechbrain/speechbrain's tests/samples (1034): kept out so that no voice of a check set built
# from those repositories is trained on.
EXCLUDED_SPEAKERS = {"librispeech": {"198", "3436", "5703", "1034"}}
ASTERISK_SKIP_DIRS = {"silence"}
GENERATED = ("fsdd", "librispeech", "asterisk", "kde", "real_sources.csv")


@dataclass(frozen=True)
class _Item:
    """One recording to write: ``source/speaker/name.wav`` from ``data`` (file bytes)."""

    source: str
    speaker: str
    name: str
    data: bytes


def _git_members(git_dir: Path, paths: list[str]) -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of every file under ``paths`` at ``HEAD`` of the bare repository ``git_dir``."""
    command = ["git", f"--git-dir={git_dir}", "archive", "--format=tar", "HEAD", *paths]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
            for member in archive:
                if member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise DataGenerationError(f"git archive failed in {git_dir}: {stderr.strip()}")


def _git_has(git_dir: Path, path: str) -> bool:
    result = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "-e", f"HEAD:{path}"],
                            capture_output=True, check=False)
    return result.returncode == 0


def _fsdd(git_dir: Path) -> Iterator[_Item]:
    for path, data in _git_members(git_dir, ["recordings"]):
        name = Path(path).name
        parts = Path(path).stem.split("_")
        if name.endswith(".wav") and len(parts) == 3:
            yield _Item("fsdd", parts[1], Path(name).stem, data)


def _resemblyzer(git_dir: Path) -> Iterator[_Item]:
    for path, data in _git_members(git_dir, ["audio_data"]):
        p = Path(path)
        if p.suffix != ".flac" or not p.parts[1].startswith("librispeech_"):
            continue
        speaker = p.stem.split("-")[0]
        yield _Item("librispeech", speaker, p.stem, data)


def _voice_of(folder: str) -> str:
    """``en_US_f_Allison`` -> ``allison``; a plain language folder keeps its name."""
    return folder.split("_")[-1].lower()


def _base_language(folder: str) -> str:
    """``sr@latin`` -> ``sr``, ``pt_BR`` -> ``pt``."""
    return folder.split("@")[0].split("_")[0].lower()


def _debian_tree(root: Path) -> Iterator[_Item]:
    asterisk = root / "usr" / "share" / "asterisk" / "sounds"
    if asterisk.is_dir():
        for voice_dir in sorted(p for p in asterisk.iterdir() if p.is_dir() and p.name.count("_") >= 3):
            for path in sorted(voice_dir.rglob("*")):
                relative = path.relative_to(voice_dir)
                if path.suffix in READABLE and path.is_file() and not set(relative.parts[:-1]) & ASTERISK_SKIP_DIRS:
                    name = f"{voice_dir.name}-{'-'.join(relative.with_suffix('').parts)}"
                    yield _Item("asterisk", _voice_of(voice_dir.name), name, path.read_bytes())
    for app, sub in (("ktuberling", "sounds"), ("klettres", "")):
        base = root / "usr" / "share" / app / sub if sub else root / "usr" / "share" / app
        if not base.is_dir():
            continue
        for lang_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for path in sorted(lang_dir.rglob("*")):
                if path.suffix in READABLE and path.is_file():
                    relative = path.relative_to(lang_dir).with_suffix("")
                    name = f"{app}-{lang_dir.name.replace('@', '-')}-{'-'.join(relative.parts)}"
                    yield _Item("kde", _base_language(lang_dir.name), name, path.read_bytes())


def _items(source: Path, scratch: Path) -> Iterator[_Item]:
    """Recognise ``source`` (a fetched bare git dir, a ``.deb``, an unpacked tree) and yield its recordings."""
    if source.is_file() and source.suffix == ".deb":
        target = scratch / source.stem
        result = subprocess.run(["dpkg-deb", "-x", str(source), str(target)], capture_output=True, check=False)
        if result.returncode != 0:
            raise DataGenerationError(f"cannot unpack {source}: {result.stderr.decode(errors='replace').strip()}")
        yield from _debian_tree(target)
        return
    if (source / "HEAD").is_file() and (source / "objects").is_dir():
        if _git_has(source, "recordings/0_jackson_0.wav"):
            yield from _fsdd(source)
            return
        if _git_has(source, "audio_data/librispeech_test-other"):
            yield from _resemblyzer(source)
            return
        raise DataGenerationError(f"{source} is a git directory of no known speech source "
                                  "(expected free-spoken-digit-dataset or Resemblyzer)")
    if source.is_dir():
        found = False
        for item in _debian_tree(source):
            found = True
            yield item
        if found:
            return
    raise DataGenerationError(f"{source}: not a fetched git directory, .deb or unpacked Debian tree holding "
                              "known recordings (see `fqss make-data real-sources --help`)")


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(audio)), rate, target).numpy()


def extract_real_sources(out: Path, sources: list[Path], overwrite: bool = False) -> list[dict[str, object]]:
    """Write every recording of ``sources`` under ``out`` (module docstring); return the per-speaker rows."""
    missing = [str(s) for s in sources if not Path(s).exists()]
    if missing:
        raise DataGenerationError(f"real-sources: {', '.join(missing)} does not exist")
    out = Path(out).resolve()
    prepare_output_dir(out, GENERATED, overwrite)
    seen: set[str] = set()
    stats: dict[tuple[str, str], dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="fqss-real-") as scratch:
        for source in sources:
            for item in _items(Path(source), Path(scratch)):
                if item.speaker in EXCLUDED_SPEAKERS.get(item.source, set()):
                    continue
                digest = hashlib.sha1(item.data).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                try:
                    audio, rate = _decode(item.data)
                except (RuntimeError, sf.LibsndfileError):
                    continue
                if len(audio) < MIN_SECONDS * rate or not np.any(audio):
                    continue
                if rate > MAX_RATE:
                    audio, rate = _resample(audio, rate, MAX_RATE), MAX_RATE
                peak = float(np.max(np.abs(audio)))
                if peak > 0.999:
                    audio = audio * (0.999 / peak)
                folder = out / item.source / item.speaker
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(folder / f"{item.name}.wav", audio, rate, subtype="PCM_16")
                row = stats.setdefault((item.source, item.speaker), {
                    "source": item.source, "speaker": item.speaker, "files": 0, "seconds": 0.0, "rates": set(),
                    "licence": LICENCES[item.source]})
                row["files"] = int(row["files"]) + 1
                row["seconds"] = float(row["seconds"]) + len(audio) / rate
                row["rates"].add(rate)  # type: ignore[union-attr]
    if not stats:
        raise DataGenerationError("real-sources: no recordings found in " + ", ".join(map(str, sources)))
    rows = []
    for key in sorted(stats):
        row = dict(stats[key])
        row["seconds"] = round(float(row["seconds"]), 2)
        row["rates"] = " ".join(str(r) for r in sorted(row["rates"]))  # type: ignore[arg-type]
        rows.append(row)
    with open(out / "real_sources.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_real_sources_summary(out: Path, rows: list[dict[str, object]]) -> str:
    """Per-source speaker count, files and hours."""
    lines = [f"real speech written to {Path(out).resolve()}"]
    for source in sorted({str(r["source"]) for r in rows}):
        mine = [r for r in rows if r["source"] == source]
        hours = sum(float(r["seconds"]) for r in mine) / 3600
        files = sum(int(r["files"]) for r in mine)
        lines.append(f"  {source}: {len(mine)} speakers, {files} files, {hours:.2f} h ({LICENCES[source]})")
    total = sum(float(r["seconds"]) for r in rows) / 3600
    lines.append(f"  total: {len(rows)} speakers, {total:.2f} h")
    return "\n".join(lines)

