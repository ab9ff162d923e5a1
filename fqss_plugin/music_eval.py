"""Music separation scores as the papers report them: museval's BSSEval v4 over MUSDB18(-HQ) tracks.

For each test track (``musdb.DB(root, is_wav=True, subsets="test")``), ``separate(mixture)`` gives the
estimated stems; ``museval.eval_mus_track`` scores them on 1 s frames. Reported, per source and overall:

* ``sdr_median`` -- the median over frames of each track, then the median over tracks (SiSEC 2018 and
  the Demucs / FQSS papers' convention; frames where a reference is silent have no score and are left out);
* ``sdr_mean_of_medians`` -- the mean over tracks of the per-track frame medians;
* ``nsdr`` -- the MDX nSDR of whole tracks, ``10 log10(Σ s² / Σ (s - ŝ)²)``, the mean over tracks
  (Demucs' validation metric).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

SOURCES = ("drums", "bass", "other", "vocals")


def nsdr(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-8) -> float:
    """MDX nSDR in dB of one stem (any shape)."""
    return float(10 * np.log10((np.sum(reference ** 2) + eps) / (np.sum((reference - estimate) ** 2) + eps)))


def evaluate_musdb(separate: Callable[[np.ndarray, int], dict[str, np.ndarray]], root: str | Path,
                   subset: str = "test", tracks: int | None = None) -> dict:
    """Score ``separate`` on the ``subset`` tracks of the MUSDB18-HQ wav folders in ``root``.

    ``separate(mixture [frames, channels], sample_rate)`` returns ``{source: [frames, channels]}`` for every
    source of :data:`SOURCES`. Returns ``{"tracks": [...per-track medians and nSDR...], "sources":
    {source: {"sdr_median", "sdr_mean_of_medians", "nsdr"}}, "sdr_median", "sdr_mean_of_medians", "nsdr"}``
    (the last three averaged over the sources, as the papers' single SDR figure).
    """
    import musdb
    import museval

    database = musdb.DB(root=str(root), is_wav=True, subsets=subset)
    if not len(database):
        raise FileNotFoundError(f"{root}: no {subset} track in MUSDB18-HQ layout ({subset}/<track>/mixture.wav ...)")
    rows = []
    for track in list(database)[:tracks]:
        estimates = separate(track.audio.astype(np.float32), track.rate)
        missing = [s for s in SOURCES if s not in estimates]
        if missing:
            raise ValueError(f"separate() returned no estimate for {missing} (track {track.name})")
        scores = museval.eval_mus_track(track, {s: estimates[s] for s in SOURCES})
        row = {"track": track.name}
        for target in scores.scores["targets"]:
            sdr = [float(frame["metrics"]["SDR"]) for frame in target["frames"]]     # Decimal or nan
            sdr = [v for v in sdr if np.isfinite(v)]
            row[f"{target['name']}_sdr_median"] = float(np.median(sdr)) if sdr else float("nan")
        for source in SOURCES:
            row[f"{source}_nsdr"] = nsdr(track.targets[source].audio, estimates[source])
        rows.append(row)
    per_source = {}
    for source in SOURCES:
        medians = np.array([row[f"{source}_sdr_median"] for row in rows])
        per_source[source] = {"sdr_median": float(np.nanmedian(medians)),
                              "sdr_mean_of_medians": float(np.nanmean(medians)),
                              "nsdr": float(np.mean([row[f"{source}_nsdr"] for row in rows]))}
    overall = {key: float(np.mean([per_source[s][key] for s in SOURCES]))
               for key in ("sdr_median", "sdr_mean_of_medians", "nsdr")}
    return {"tracks": rows, "sources": per_source, **overall}
