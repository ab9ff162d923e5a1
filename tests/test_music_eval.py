"""museval scoring of the toy MUSDB18-HQ: oracle stems score high, the mixture as every stem scores low."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fqss_plugin.data.music import MusicConfig, generate_music
from fqss_plugin.music_eval import SOURCES, evaluate_musdb, nsdr


@pytest.fixture(scope="module")
def musdb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("musdb")
    generate_music(MusicConfig(out=root, train_tracks=1, test_tracks=1, valid_tracks=0, seconds=3.0, jobs=1,
                               progress=False))
    return root


def test_oracle_scores_high_and_the_mixture_low(musdb_root):
    import musdb
    track = musdb.DB(root=str(musdb_root), is_wav=True, subsets="test")[0]
    stems = {s: track.targets[s].audio for s in SOURCES}

    oracle = evaluate_musdb(lambda mix, rate: {s: stems[s] + 1e-3 * np.sin(np.arange(len(mix)))[:, None]
                                               for s in SOURCES}, musdb_root)
    mixture = evaluate_musdb(lambda mix, rate: {s: mix for s in SOURCES}, musdb_root)
    assert oracle["sdr_median"] > 20 and mixture["sdr_median"] < 5
    assert oracle["nsdr"] > mixture["nsdr"]
    assert len(oracle["tracks"]) == 1 and set(oracle["sources"]) == set(SOURCES)
    assert math.isclose(mixture["sources"]["vocals"]["nsdr"], nsdr(stems["vocals"], track.audio), rel_tol=1e-6)


def test_a_missing_stem_is_named(musdb_root):
    with pytest.raises(ValueError, match="bass"):
        evaluate_musdb(lambda mix, rate: {s: mix for s in SOURCES if s != "bass"}, musdb_root)
