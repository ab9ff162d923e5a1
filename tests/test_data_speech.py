"""The synthetic Libri2Mix: LibriMix layout, exact sums, disjoint speakers, determinism, toolkit loaders."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fqss_plugin.data import tools
from fqss_plugin.data.__main__ import main as data_main
from fqss_plugin.data.errors import MissingToolError
from fqss_plugin.data.librimix import SPEECHBRAIN_COLUMNS, prepare_librimix_csv
from fqss_plugin.data.loudness import gain_for_loudness, integrated_loudness
from fqss_plugin.data.pitch import median_f0
from fqss_plugin.data.speech import SpeechConfig, generate_speech


SPLITS = ("train-360", "dev", "test", "test-flite")
MIXTURE_ID = re.compile(r"^\d+-\d+-\d{4}_\d+-\d+-\d{4}$")
COLUMNS = {
    "mix_clean": ["mixture_ID", "mixture_path", "source_1_path", "source_2_path", "length"],
    "mix_both": ["mixture_ID", "mixture_path", "source_1_path", "source_2_path", "noise_path", "length"],
    "mix_single": ["mixture_ID", "mixture_path", "source_1_path", "noise_path", "length"],
}
PARTS = {"mix_clean": ("s1", "s2"), "mix_both": ("s1", "s2", "noise"), "mix_single": ("s1", "noise")}


def tiny(out: Path, **overrides) -> SpeechConfig:
    """4 train mixtures, 2 per evaluation split, 8 kHz min: a couple of seconds of synthesis."""
    settings = dict(out=out, hours=0.003, train_speakers=4, eval_speakers=3, eval_mixtures=2, jobs=1, progress=False)
    settings.update(overrides)
    return SpeechConfig(**settings)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speech")
    generate_speech(tiny(root))
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def metadata(root: Path, split: str, mix_type: str, rate: str = "wav8k", mode: str = "min") -> list[dict[str, str]]:
    return read_csv(root / "Libri2Mix" / rate / mode / "metadata" / f"mixture_{split}_{mix_type}.csv")


def speaker(utterance_id: str) -> str:
    return utterance_id.split("-")[0]


def test_layout_and_metadata_are_librimix(speech):
    base = speech / "Libri2Mix" / "wav8k" / "min"
    for split in SPLITS:
        assert sorted(p.name for p in (base / split).iterdir()) == sorted(
            ["s1", "s2", "noise", "mix_clean", "mix_both", "mix_single"])
        for mix_type, columns in COLUMNS.items():
            with open(base / "metadata" / f"mixture_{split}_{mix_type}.csv", encoding="utf-8") as handle:
                assert handle.readline().strip().split(",") == columns
            rows = metadata(speech, split, mix_type)
            assert len(rows) == (4 if split == "train-360" else 2)
            for row in rows:
                assert MIXTURE_ID.match(row["mixture_ID"])
                mixture = Path(row["mixture_path"])
                assert mixture.is_absolute() and mixture == base / split / mix_type / f"{row['mixture_ID']}.wav"
                info = sf.info(mixture)
                assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
                assert info.frames == int(row["length"])
        metrics = read_csv(base / "metadata" / f"metrics_{split}_mix_both.csv")
        assert list(metrics[0]) == ["mixture_ID", "source_1_SNR", "source_2_SNR", "noise_SNR"]


def test_mixtures_are_sample_exact_sums(speech):
    for split in SPLITS:
        for mix_type, parts in PARTS.items():
            for row in metadata(speech, split, mix_type):
                mixture, _ = sf.read(row["mixture_path"], dtype="float32")
                folder = Path(row["mixture_path"]).parent.parent
                sources = [sf.read(folder / part / Path(row["mixture_path"]).name, dtype="float32")[0] for part in parts]
                assert np.array_equal(mixture, np.sum(sources, axis=0, dtype=np.float32))
                assert all(len(s) == len(mixture) for s in sources)  # min mode: all cut to the shortest


def test_speakers_are_disjoint_between_splits_and_within_mixtures(speech):
    speakers = {}
    for split in SPLITS:
        ids = [row["mixture_ID"].split("_") for row in metadata(speech, split, "mix_clean")]
        assert all(speaker(a) != speaker(b) for a, b in ids)
        speakers[split] = {speaker(u) for pair in ids for u in pair}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not speakers[a] & speakers[b], (a, b)
    voices = read_csv(speech / "voices.csv")
    assert {v["speaker_id"] for v in voices if v["split"] == "test"} == speakers["test"]
    assert {v["engine"] for v in voices if v["split"] == "test-flite"} == {"flite"}
    assert {v["engine"] for v in voices if v["split"] != "test-flite"} == {"espeak-ng"}
    speakers_txt = (speech / "LibriSpeech" / "SPEAKERS.TXT").read_text()
    assert all(re.search(rf"^{v['speaker_id']}\s*\| {v['sex']} \|", speakers_txt, re.M) for v in voices)


def test_voices_reach_their_pitch_and_female_voices_are_higher(speech):
    voices = read_csv(speech / "voices.csv")
    for voice in voices:
        assert float(voice["f0_measured_hz"]) == pytest.approx(float(voice["f0_target_hz"]), rel=0.12), voice
    female = [float(v["f0_measured_hz"]) for v in voices if v["sex"] == "F"]
    male = [float(v["f0_measured_hz"]) for v in voices if v["sex"] == "M"]
    assert min(female) > 155 and max(male) < 165
    assert np.median(female) > 1.4 * np.median(male)


def test_librispeech_tree_and_transcripts(speech):
    flacs = sorted((speech / "LibriSpeech").rglob("*.flac"))
    assert flacs
    for flac in flacs:
        info = sf.info(flac)
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
        assert 1.5 < info.duration < 9.0
        spk, chapter, _ = flac.stem.split("-")
        assert flac.parent == flac.parents[2] / spk / chapter
        transcript = (flac.parent / f"{spk}-{chapter}.trans.txt").read_text()
        assert re.search(rf"^{flac.stem} [A-Z' ]+$", transcript, re.M)


def test_asteroid_librimix_reads_clean_and_noisy(speech):
    from asteroid.data import LibriMix

    for task, mix_type in (("sep_clean", "mix_clean"), ("sep_noisy", "mix_both")):
        dataset = LibriMix(str(speech / "data" / "wav8k" / "min" / "train-360"), task=task, sample_rate=8000,
                           n_src=2, segment=None, return_id=True)
        rows = metadata(speech, "train-360", mix_type)
        assert len(dataset) == len(rows)
        mixture, sources, ids = dataset[0]
        assert sources.shape == (2, mixture.shape[0])
        assert "_".join(ids) == rows[0]["mixture_ID"]
        difference = mixture - sources.sum(0)
        if task == "sep_clean":
            assert float(difference.abs().max()) == 0.0
        else:
            noise, _ = sf.read(rows[0]["noise_path"], dtype="float32")
            assert np.array_equal(difference.numpy(), noise)
    cropped = LibriMix(str(speech / "data" / "wav8k" / "min" / "dev"), task="sep_clean", sample_rate=8000, segment=1)
    assert cropped[0][0].shape == (8000,)


def test_asteroid_eval_finds_test_annotations(speech):
    test_dir = speech / "data" / "wav8k" / "min" / "test"
    annotations = read_csv(test_dir.parent.parent.parent / "test_annotations.csv")  # as eval.py computes it
    texts = {row["utt_id"]: row["text"] for row in annotations}
    for row in metadata(speech, "test", "mix_clean") + metadata(speech, "test-flite", "mix_clean"):
        for utterance in row["mixture_ID"].split("_"):
            assert re.fullmatch(r"[A-Z' ]+", texts[utterance])


def test_speechbrain_csv_and_pipeline(speech, tmp_path):
    import speechbrain as sb
    from speechbrain.dataio.dataio import read_audio
    from speechbrain.dataio.dataset import DynamicItemDataset

    for addnoise, mix_type in ((False, "mix_clean"), (True, "mix_both")):
        save = tmp_path / mix_type
        written = prepare_librimix_csv(speech / "Libri2Mix", save, fs=8000, addnoise=addnoise)
        assert [p.name for p in written] == ["libri2mix_train-360.csv", "libri2mix_dev.csv", "libri2mix_test.csv"]
        with open(written[0], encoding="utf-8") as handle:
            assert tuple(handle.readline().strip().split(",")) == SPEECHBRAIN_COLUMNS
        dataset = DynamicItemDataset.from_csv(csv_path=str(written[0]))
        for key in ("mix", "s1", "s2", "noise"):
            @sb.utils.data_pipeline.takes(f"{key}_wav")
            @sb.utils.data_pipeline.provides(f"{key}_sig")
            def audio_pipeline(path):
                return read_audio(path)
            sb.dataio.dataset.add_dynamic_item([dataset], audio_pipeline)
        sb.dataio.dataset.set_output_keys([dataset], ["id", "mix_sig", "s1_sig", "s2_sig", "noise_sig"])
        assert len(dataset) == 4
        item = dataset[0]
        expected = item["s1_sig"] + item["s2_sig"] + (item["noise_sig"] if addnoise else 0)
        assert float((item["mix_sig"] - expected).abs().max()) == 0.0
        assert f"/{mix_type}/" in read_csv(written[0])[0]["mix_wav"]


def test_same_seed_same_data_extra_rates_do_not_change_it(speech, tmp_path):
    summary = generate_speech(tiny(tmp_path / "again", sample_rates=(8000, 16000), modes=("min", "max"),
                                   mix_types=("mix_clean",)))
    assert summary["splits"]["train-360"]["mixtures"] == 4
    for row in metadata(speech, "dev", "mix_clean"):
        again = Path(str(row["mixture_path"]).replace(str(speech), str(tmp_path / "again")))
        assert again.read_bytes() == Path(row["mixture_path"]).read_bytes()
    assert not (tmp_path / "again" / "Libri2Mix" / "wav8k" / "min" / "dev" / "noise").exists()
    # max mode pads to the longer utterance; 16 kHz holds the same mixtures at twice the rate
    for row_min, row_max in zip(metadata(tmp_path / "again", "test", "mix_clean", "wav16k", "min"),
                                metadata(tmp_path / "again", "test", "mix_clean", "wav16k", "max")):
        assert row_min["mixture_ID"] == row_max["mixture_ID"] and int(row_max["length"]) >= int(row_min["length"])
    eight = metadata(speech, "test", "mix_clean")
    sixteen = metadata(tmp_path / "again", "test", "mix_clean", "wav16k")
    assert [int(r["length"]) * 2 for r in eight] == pytest.approx([int(r["length"]) for r in sixteen], abs=2)

    other = generate_speech(tiny(tmp_path / "other", seed=1, cross_engine=False, mix_types=("mix_clean",)))
    assert "test-flite" not in other["splits"]
    assert {r["mixture_ID"] for r in metadata(tmp_path / "other", "dev", "mix_clean")}.isdisjoint(
        r["mixture_ID"] for r in metadata(speech, "dev", "mix_clean"))


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert data_main(["speech", "--out", str(tmp_path), "--hours", "0", "--quiet"]) == 2
    assert "--hours must be > 0" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert data_main(["speech", "--out", str(blocker / "sub"), "--quiet"]) == 2
    assert "is not a writable directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        data_main(["speech", "--out", str(tmp_path), "--sample-rate", "44100"])
    assert exit_info.value.code == 2
    assert "--sample-rate: invalid choice" in capsys.readouterr().err


def test_existing_output_is_not_overwritten_silently(speech, capsys):
    assert data_main(["speech", "--out", str(speech), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_missing_tool_gives_install_instruction(monkeypatch, tmp_path):
    monkeypatch.setattr(tools.shutil, "which", lambda name: None if name == "flite" else "/usr/bin/" + name)
    with pytest.raises(MissingToolError, match=r"sudo apt-get install flite"):
        generate_speech(tiny(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_loudness_meter_and_pitch_estimator_reference_signals():
    for sr in (16000, 44100):
        t = np.arange(3 * sr) / sr
        sine = np.sin(2 * np.pi * 997 * t)
        assert integrated_loudness(sine, sr) == pytest.approx(-3.0, abs=0.15)
        assert integrated_loudness(gain_for_loudness(sine, sr, -28.0) * sine, sr) == pytest.approx(-28.0, abs=1e-6)
    sr = 16000
    t = np.arange(sr) / sr
    voiced = sum(np.sin(2 * np.pi * k * 150 * t) / k for k in range(1, 10))
    assert median_f0(voiced, sr) == pytest.approx(150, rel=0.01)


def test_merge_train_adds_the_extra_mixtures_and_keeps_dev_and_test(speech, tmp_path, capsys):
    """``fqss make-data merge-train``: more training data for a teacher, the same evaluation splits."""
    generate_speech(tiny(tmp_path / "extra", seed=1, cross_engine=False, mix_types=("mix_clean",)))
    out = tmp_path / "merged" / "data"
    assert data_main(["merge-train", "--out", str(out), str(speech / "data"), str(tmp_path / "extra" / "data")]) == 0
    assert "mixture_train-360_mix_clean.csv 8 rows" in capsys.readouterr().out
    split_dir = out / "wav8k" / "min"
    merged = read_csv(split_dir / "train-360" / "mixture_train-360_mix_clean.csv")
    base = read_csv(speech / "data" / "wav8k" / "min" / "train-360" / "mixture_train-360_mix_clean.csv")
    assert merged[:4] == base and all(Path(row["mixture_path"]).is_file() for row in merged)
    assert not (split_dir / "train-360" / "mixture_train-360_mix_both.csv").exists()   # the extra has no noise
    for split in ("dev", "test", "test-flite"):
        for name in (speech / "data" / "wav8k" / "min" / split).iterdir():
            assert (split_dir / split / name.name).read_bytes() == name.read_bytes()
    from asteroid.data import LibriMix
    assert len(LibriMix(csv_dir=str(split_dir / "train-360"), task="sep_clean", segment=None)) == 8
    wrong = tmp_path / "wrong" / "wav8k" / "min" / "train-360"
    wrong.mkdir(parents=True)
    (wrong / "mixture_train-360_mix_clean.csv").write_text("mixture_ID,length\nx,1\n")
    assert data_main(["merge-train", "--out", str(tmp_path / "m2"), str(speech / "data"),
                      str(tmp_path / "wrong")]) == 2
    assert "has the columns 'mixture_ID,length'" in capsys.readouterr().err
    assert data_main(["merge-train", "--out", str(tmp_path / "m3"), str(speech / "data"), str(tmp_path)]) == 2
    assert "has no wav*/<mode>/train-360/mixture_train-360_*.csv" in capsys.readouterr().err
