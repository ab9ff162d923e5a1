"""Median fundamental frequency of a speech signal (voice-distinctness check).

For each 40 ms frame (10 ms hop) the normalised autocorrelation

    r(tau) = sum_t x[t] x[t+tau] / sqrt(sum_t x[t]^2 * sum_t x[t+tau]^2)

is evaluated for lags tau in [sr/fmax, sr/fmin].  A frame is *voiced* when its
energy is within 40 dB of the loudest frame and max_tau r(tau) >= 0.6; its f0
is sr / tau*, where tau* is the shortest lag holding a local peak of r within
90 % of the maximum (so a period's multiples 2T, 3T are not taken for T),
refined by parabolic interpolation.  The utterance's
f0 is the median over voiced frames (NaN when none is voiced).  This is a
plain, fast estimator; on espeak-ng/flite speech it agrees with
``librosa.pyin`` to within a few percent.
"""
from __future__ import annotations

import numpy as np

FRAME_S = 0.040
HOP_S = 0.010
VOICING_THRESHOLD = 0.6
ENERGY_RANGE_DB = 40.0
OCTAVE_TOLERANCE = 0.9


def median_f0(x: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 400.0) -> float:
    """Median f0 in Hz over the voiced frames of mono signal ``x`` (NaN if unvoiced)."""
    frame, hop = int(FRAME_S * sr), int(HOP_S * sr)
    min_lag, max_lag = int(sr / fmax), int(np.ceil(sr / fmin))
    span = frame + max_lag + 1  # a frame plus every lag (one extra for interpolation)
    if len(x) < span:
        return float("nan")
    starts = np.arange(0, len(x) - span + 1, hop)
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), span)[starts]
    energy = np.sum(windows[:, :frame] ** 2, axis=1)
    loud = energy > energy.max() * 10 ** (-ENERGY_RANGE_DB / 10)
    windows = windows[loud]
    n_fft = 1 << int(np.ceil(np.log2(2 * span)))
    head = np.fft.rfft(windows[:, :frame], n_fft)
    full = np.fft.rfft(windows, n_fft)
    cross = np.fft.irfft(np.conj(head) * full, n_fft)[:, : max_lag + 2]  # sum_t x[t] x[t+tau]
    cumsum = np.concatenate([np.zeros((len(windows), 1)), np.cumsum(windows**2, axis=1)], axis=1)
    lags = np.arange(max_lag + 2)
    lagged_energy = cumsum[:, lags + frame] - cumsum[:, lags]  # sum_t x[t+tau]^2
    nccf = cross / np.sqrt(cumsum[:, [frame]] * lagged_energy + 1e-12)
    search = nccf[:, min_lag : max_lag + 1]
    # shortest lag whose local peak is within OCTAVE_TOLERANCE of the best one (avoids picking 2T, 3T ...)
    padded = np.pad(search, ((0, 0), (1, 1)), constant_values=-np.inf)
    local_peak = (search >= padded[:, :-2]) & (search >= padded[:, 2:])
    near_best = search >= OCTAVE_TOLERANCE * search.max(axis=1, keepdims=True)
    best = np.argmax(local_peak & near_best, axis=1) + min_lag
    peak = nccf[np.arange(len(best)), best]
    voiced = peak >= VOICING_THRESHOLD
    if not voiced.any():
        return float("nan")
    rows = np.nonzero(voiced)[0]
    b = best[rows]
    left, mid, right = nccf[rows, b - 1], nccf[rows, b], nccf[rows, b + 1]
    denom = left - 2 * mid + right
    shift = np.where(np.abs(denom) > 1e-12, 0.5 * (left - right) / denom, 0.0)
    return float(np.median(sr / (b + np.clip(shift, -0.5, 0.5))))
