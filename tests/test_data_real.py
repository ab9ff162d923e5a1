"""Real recorded speech in the embedded Libri2Mix: reader errors, speaker split, test-real layout, determinism.

Everything runs on tiny generated recordings (harmonic tones with a speaker-specific
pitch), never on the fetched corpora.
"""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fqss_plugin.data.__main__ import main as data_main
from fqss_plugin.data.augment import augment_voices
from fqss_plugin.data.errors import DataGenerationError
from fqss_plugin.data.real import plan_real_utterance, render_real_utterance, scan_real_speech, split_speakers
from fqss_plugin.data.real_sources import extract_real_sources
from fqss_plugin.data.speech import REAL_SPEAKER_ID_START, SpeechConfig, generate_speech

COLUMNS = {
    "mix_clean": ["mixture_ID", "mixture_path", "source_1_path", "source_2_path", "length"],
    "mix_both": ["mixture_ID", "mixture_path", "source_1_path", "source_2_path", "noise_path", "length"],
}


def voice(f0: float, seconds: float, sr: int, seed: int) -> np.ndarray:
    """A crude voiced sound: harmonics of ``f0`` with a slow vibrato and syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / sr
    x = sum(np.sin(k * phase + rng.uniform(0, 6)) / k for k in range(1, 8) if k * f0 < sr / 2)
    return 0.3 * x * (0.55 + 0.45 * np.sin(2 * np.pi * 3 * t)) / 2


def make_real_folder(root: Path) -> Path:
    """Two sources: ``lab`` (4 speakers, 8 kHz wav, short words) and ``book`` (3 speakers, 16 kHz flac)."""
    for index in range(4):
        folder = root / "lab" / f"spk{index}"
        folder.mkdir(parents=True)
        for k in range(4):
            sf.write(folder / f"{k}.wav", voice(100 + 40 * index, 0.6, 8000, k), 8000, subtype="PCM_16")
    for index in range(3):
        folder = root / "book" / f"reader{index}"
        folder.mkdir(parents=True)
        sf.write(folder / "chapter.flac", voice(120 + 35 * index, 7.0, 16000, index), 16000, subtype="PCM_16")
    (root / "README.txt").write_text("not audio\n")
    return root


def tiny(out: Path, real: Path | None, **overrides) -> SpeechConfig:
    settings = dict(out=out, hours=0.003, train_speakers=4, eval_speakers=3, eval_mixtures=2, jobs=1,
                    progress=False, cross_engine=False, real_speech=real, real_dev_fraction=0.25,
                    real_test_fraction=0.34, real_test_mixtures=3, mix_types=("mix_clean", "mix_both"))
    settings.update(overrides)
    return SpeechConfig(**settings)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory) -> Path:
    return make_real_folder(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, real_folder) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    generate_speech(tiny(out, real_folder))
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def speakers_of(root: Path, split: str) -> set[int]:
    rows = read_csv(root / "Libri2Mix" / "wav8k" / "min" / "metadata" / f"mixture_{split}_mix_clean.csv")
    return {int(u.split("-")[0]) for r in rows for u in r["mixture_ID"].split("_")}


# --- the reader ------------------------------------------------------------------------------------------

def test_missing_folder_is_one_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataGenerationError, match=f"--real-speech {missing}: no such directory"):
        scan_real_speech(missing)
    out = tmp_path / "out"
    assert data_main(["speech", "--out", str(out), "--real-speech", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --real-speech") and str(missing) in err[0]
    assert not out.exists() or not any(out.iterdir())  # nothing written before the error


def test_folder_without_audio_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "spk").mkdir()
    (tmp_path / "spk" / "notes.txt").write_text("hello")
    (tmp_path / "spk" / "broken.wav").write_bytes(b"not a wav file")
    with pytest.raises(DataGenerationError, match=f"--real-speech {tmp_path} holds no readable audio"):
        scan_real_speech(tmp_path)
    assert data_main(["speech", "--out", str(tmp_path / "out"), "--real-speech", str(tmp_path), "--quiet"]) == 2
    assert "holds no readable audio" in capsys.readouterr().err


def test_reader_layouts(tmp_path, real_folder):
    speakers = scan_real_speech(real_folder)
    assert sorted(speakers) == ["book/reader0", "book/reader1", "book/reader2",
                                "lab/spk0", "lab/spk1", "lab/spk2", "lab/spk3"]
    assert all(len(r) == 4 for s, r in speakers.items() if s.startswith("lab/"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("alice_1.wav", "alice_2.wav", "bob-1.wav", "bob-7.wav", "x.txt"):
        if name.endswith(".wav"):
            sf.write(flat / name, voice(150, 1.5, 8000, 0), 8000)
    assert {s: len(r) for s, r in scan_real_speech(flat).items()} == {"alice": 2, "bob": 2}
    assert sorted(scan_real_speech(flat, r"^(\w)")) == ["a", "b"]


def test_utterances_join_excerpts_of_one_speaker(real_folder):
    recordings = scan_real_speech(real_folder)["lab/spk1"]
    rng = np.random.default_rng(0)
    excerpts = plan_real_utterance(rng, recordings)
    assert len(excerpts) >= 2 and {Path(e.path).parent.name for e in excerpts} == {"spk1"}
    audio = render_real_utterance(excerpts, 16000)
    assert 1.5 < len(audio) / 16000 < 6.5 and np.max(np.abs(audio)) <= 0.9
    long = scan_real_speech(real_folder)["book/reader0"]
    single = plan_real_utterance(np.random.default_rng(1), long)
    assert len(single) == 1 and 2.0 <= single[0].seconds <= 6.0


# --- the speaker split -----------------------------------------------------------------------------------

def test_split_is_disjoint_complete_stratified_and_deterministic():
    names = [f"src{g}/spk{i}" for g in range(3) for i in range(12)] + ["flat_a", "flat_b", "flat_c"]
    split = split_speakers(names, seed=0, dev_fraction=0.1, test_fraction=0.2)
    assert sorted(sum(split.values(), [])) == sorted(names)
    assert not set(split["train"]) & set(split["dev"]) | set(split["train"]) & set(split["test"]) \
        | set(split["dev"]) & set(split["test"])
    for group in ("src0", "src1", "src2"):
        assert sum(s.startswith(group) for s in split["test"]) == round(0.2 * 12)
        assert sum(s.startswith(group) for s in split["dev"]) >= 1
    assert split_speakers(list(reversed(names)), 0, 0.1, 0.2) == split
    assert split_speakers(names, 1, 0.1, 0.2) != split


# --- the generated dataset -------------------------------------------------------------------------------

def test_real_speakers_are_disjoint_between_splits(dataset):
    train, dev, test_real = (speakers_of(dataset, s) for s in ("train-360", "dev", "test-real"))
    real = lambda ids: {i for i in ids if i >= REAL_SPEAKER_ID_START}  # noqa: E731
    assert real(train) and test_real and test_real == real(test_real)  # test-real: real speakers only
    assert not real(train) & test_real and not real(dev) & test_real and not real(train) & real(dev)
    assert not real(speakers_of(dataset, "test"))  # the synthetic test split stays synthetic
    assert train - real(train)  # train mixes synthetic voices too
    rows = read_csv(dataset / "real_speakers.csv")
    by_split: dict[str, set[str]] = {}
    for row in rows:
        by_split.setdefault(row["split"], set()).add(row["name"])
    assert sum(len(v) for v in by_split.values()) == len({r["name"] for r in rows})
    assert {int(r["speaker_id"]) for r in rows if r["split"] == "test-real"} == test_real
    assert {r["source"] for r in rows if r["split"] == "test-real"} == {"lab", "book"}


def test_test_real_is_in_librimix_layout(dataset):
    base = dataset / "Libri2Mix" / "wav8k" / "min"
    assert sorted(p.name for p in (base / "test-real").iterdir()) == ["mix_both", "mix_clean", "noise", "s1", "s2"]
    for mix_type, columns in COLUMNS.items():
        path = base / "metadata" / f"mixture_test-real_{mix_type}.csv"
        assert path.read_text().splitlines()[0].split(",") == columns
        rows = read_csv(path)
        assert len(rows) == 3
        for row in rows:
            mixture, sr = sf.read(row["mixture_path"], dtype="float32")
            assert sr == 8000 and sf.info(row["mixture_path"]).subtype == "PCM_16"
            assert Path(row["mixture_path"]) == base / "test-real" / mix_type / f"{row['mixture_ID']}.wav"
            parts = [sf.read(row[k], dtype="float32")[0] for k in columns[2:-1]]
            assert np.array_equal(mixture, np.sum(parts, axis=0, dtype=np.float32))
    local = dataset / "data" / "wav8k" / "min" / "test-real" / "mixture_test-real_mix_clean.csv"
    assert local.is_file()  # Asteroid's recipe-local metadata folder
    from asteroid.data import LibriMix

    mixture, sources = LibriMix(str(local.parent), task="sep_clean", sample_rate=8000, segment=None)[0]
    assert sources.shape == (2, mixture.shape[0])


def test_same_seed_same_bytes_and_default_stays_synthetic(tmp_path, dataset, real_folder):
    again = tmp_path / "again"
    generate_speech(tiny(again, real_folder, jobs=2))
    old = sorted(p.relative_to(dataset) for p in (dataset / "Libri2Mix").rglob("*.wav"))
    assert old == sorted(p.relative_to(again) for p in (again / "Libri2Mix").rglob("*.wav"))
    assert all((dataset / p).read_bytes() == (again / p).read_bytes() for p in old)
    assert (dataset / "real_speakers.csv").read_text() == (again / "real_speakers.csv").read_text()


def test_augmentation_is_seeded_and_changes_the_voice():
    sr = 16000
    voices = [voice(120, 2.0, sr, 0), voice(210, 2.5, sr, 1)]
    first = augment_voices(voices, sr, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, augment_voices(voices, sr, seed=3)))
    assert any(len(a) != len(b) or not np.allclose(a, b) for a, b in zip(first, voices))
    assert all(np.all(np.isfinite(a)) and 1.0 < len(a) / sr < 4.5 for a in first)
    other = augment_voices(voices, sr, seed=4)
    assert any(len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first, other))


# --- extraction from sources -----------------------------------------------------------------------------

def test_real_sources_extracts_debian_trees_and_git_repositories(tmp_path):
    tree = tmp_path / "deb"
    for folder in ("en_US_f_Allison/digits", "es_MX_f_Allison", "it_IT_m_Carlo/silence"):
        (tree / "usr/share/asterisk/sounds" / folder).mkdir(parents=True)
    sf.write(tree / "usr/share/asterisk/sounds/en_US_f_Allison/digits/1.wav", voice(200, 1.2, 8000, 0), 8000)
    sf.write(tree / "usr/share/asterisk/sounds/es_MX_f_Allison/hola.wav", voice(200, 1.2, 8000, 1), 8000)
    sf.write(tree / "usr/share/asterisk/sounds/it_IT_m_Carlo/silence/1.wav", np.zeros(8000), 8000)
    for lang in ("sr", "sr@latin"):  # identical bytes in two language variants: one speaker, one file
        (tree / "usr/share/ktuberling/sounds" / lang).mkdir(parents=True)
        sf.write(tree / "usr/share/ktuberling/sounds" / lang / "eye.wav", voice(180, 2.5, 44100, 2), 44100)
    repo = tmp_path / "fsdd"
    (repo / "recordings").mkdir(parents=True)
    for seed, (name, seconds) in enumerate((("0_jackson_0", 1.1), ("1_jackson_1", 1.1), ("0_theo_0", 0.4))):
        sf.write(repo / "recordings" / f"{name}.wav", voice(110, seconds, 8000, seed), 8000)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)

    out = tmp_path / "real"
    rows = extract_real_sources(out, [tree, repo / ".git"])
    assert {(r["source"], r["speaker"], r["files"]) for r in rows} == {
        ("asterisk", "allison", 2), ("kde", "sr", 1), ("fsdd", "jackson", 2), ("fsdd", "theo", 1)}
    assert sf.info(next((out / "kde" / "sr").iterdir())).samplerate == 16000  # capped at 16 kHz
    assert sorted(scan_real_speech(out)) == ["asterisk/allison", "fsdd/jackson", "kde/sr"]  # theo: < 2 s
    with pytest.raises(DataGenerationError, match="does not exist"):
        extract_real_sources(tmp_path / "x", [tmp_path / "missing.deb"])
    with pytest.raises(DataGenerationError, match="already holds"):
        extract_real_sources(out, [tree])
