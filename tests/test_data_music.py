"""The toy MUSDB18-HQ: layout, musdb's loader and validation split, exact mixture, determinism."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fqss_plugin.data.__main__ import main as data_main
from fqss_plugin.data.music import STEMS, MusicConfig, generate_music, musdb_validation_names



def tiny(out: Path, **overrides) -> MusicConfig:
    settings = dict(out=out, train_tracks=2, test_tracks=1, valid_tracks=1, seconds=4.0, jobs=1, progress=False)
    settings.update(overrides)
    return MusicConfig(**settings)


@pytest.fixture(scope="module")
def music(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("music")
    generate_music(tiny(root))
    return root


def test_layout_is_musdb18hq(music):
    for subset, count in (("train", 2), ("test", 1)):
        tracks = sorted((music / subset).iterdir())
        assert len(tracks) == count
        for track in tracks:
            assert " - " in track.name
            assert sorted(p.name for p in track.iterdir()) == sorted(f"{s}.wav" for s in ("mixture", *STEMS))
            for wav in track.iterdir():
                info = sf.info(wav)
                assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_16")
                assert info.frames == 4 * 44100


def test_musdb_loads_tracks_and_mixture_is_exact_sum_of_stems(music):
    import musdb

    database = musdb.DB(root=str(music), is_wav=True)
    assert len(database) == 3
    for track in database:
        assert track.rate == 44100 and track.audio.shape == (4 * 44100, 2)
        stems = sum(track.sources[name].audio for name in STEMS)
        assert np.array_equal(track.audio, stems)
        assert np.array_equal(track.targets["linear_mixture"].audio, track.audio)
        assert all(np.abs(track.sources[name].audio).max() > 0.01 for name in STEMS)
    valid = musdb.DB(root=str(music), is_wav=True, subsets="train", split="valid")
    train = musdb.DB(root=str(music), is_wav=True, subsets="train", split="train")
    assert [t.name for t in valid] == musdb_validation_names()[:1]
    assert len(train) == 1


def test_same_seed_same_songs(music, tmp_path):
    generate_music(tiny(tmp_path))
    for wav in sorted(music.rglob("*.wav")):
        assert (tmp_path / wav.relative_to(music)).read_bytes() == wav.read_bytes()


def test_cli_errors_name_the_parameter(tmp_path, capsys):
    assert data_main(["music", "--out", str(tmp_path), "--valid-tracks", "5", "--train-tracks", "2", "--quiet"]) == 2
    assert "--valid-tracks" in capsys.readouterr().err
    assert data_main(["music", "--out", str(tmp_path), "--seconds", "1", "--quiet"]) == 2
    assert "--seconds must be >= 2" in capsys.readouterr().err
