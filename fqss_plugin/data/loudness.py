"""Integrated loudness (ITU-R BS.1770-4, mono) and the gain that sets it.

LibriMix sets every source to a random loudness measured with ``pyloudnorm``
(a BS.1770-4 meter).  The same measurement is implemented here with numpy and
scipy so that no extra dependency is needed:

1. K-weighting: a high-shelf biquad (+4 dB above ~1.5 kHz, Q = 1/sqrt(2)) then a
   high-pass biquad (38 Hz, Q = 0.5), designed with the RBJ audio-EQ-cookbook
   formulas at the signal's own sample rate (the parametrisation pyloudnorm uses).
2. Mean square ``z_j`` of the weighted signal ``y`` over 400 ms blocks with 75 %
   overlap; block loudness ``l_j = -0.691 + 10 log10 z_j``.
3. Gating: keep blocks with ``l_j > -70`` LUFS (absolute gate), then those above
   ``Gamma_r = -0.691 + 10 log10(mean kept z_j) - 10`` (relative gate).
4. ``L = -0.691 + 10 log10(mean of the z_j that passed both gates)``.

A 0 dBFS 997 Hz sine measures -3.0 LUFS.  A signal shorter than one block is
measured as a single block.  :func:`gain_for_loudness` returns
``g = 10 ** ((target - L) / 20)``, the amplitude factor that moves ``L`` to
``target`` (loudness is homogeneous: ``L(g x) = L(x) + 20 log10 g``).
"""
from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

BLOCK_S = 0.4
OVERLAP = 0.75
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0
SHELF = (4.0, 1 / np.sqrt(2), 1500.0)  # gain dB, Q, centre Hz
HIGH_PASS = (0.5, 38.0)  # Q, corner Hz


def _high_shelf(sr: int) -> tuple[np.ndarray, np.ndarray]:
    gain_db, q, fc = SHELF
    a = 10 ** (gain_db / 40)
    w0 = 2 * np.pi * fc / sr
    alpha = np.sin(w0) / (2 * q)
    cos, root = np.cos(w0), 2 * np.sqrt(a) * alpha
    b = a * np.array([(a + 1) + (a - 1) * cos + root, -2 * ((a - 1) + (a + 1) * cos), (a + 1) + (a - 1) * cos - root])
    den = np.array([(a + 1) - (a - 1) * cos + root, 2 * ((a - 1) - (a + 1) * cos), (a + 1) - (a - 1) * cos - root])
    return b / den[0], den / den[0]


def _high_pass(sr: int) -> tuple[np.ndarray, np.ndarray]:
    q, fc = HIGH_PASS
    w0 = 2 * np.pi * fc / sr
    alpha = np.sin(w0) / (2 * q)
    cos = np.cos(w0)
    b = np.array([(1 + cos) / 2, -(1 + cos), (1 + cos) / 2])
    den = np.array([1 + alpha, -2 * cos, 1 - alpha])
    return b / den[0], den / den[0]


def integrated_loudness(x: np.ndarray, sr: int) -> float:
    """BS.1770-4 integrated loudness of mono ``x`` in LUFS (``-inf`` for silence)."""
    y = lfilter(*_high_shelf(sr), x.astype(np.float64))
    y = lfilter(*_high_pass(sr), y)
    block, hop = int(BLOCK_S * sr), int(BLOCK_S * (1 - OVERLAP) * sr)
    if len(y) <= block:
        z = np.array([np.mean(y**2)])
    else:
        z = np.mean(np.lib.stride_tricks.sliding_window_view(y**2, block)[::hop], axis=1)
    with np.errstate(divide="ignore"):
        level = -0.691 + 10 * np.log10(z)
        kept = z[level > ABSOLUTE_GATE_LUFS]
        if kept.size == 0:
            return float("-inf")
        relative_gate = -0.691 + 10 * np.log10(kept.mean()) + RELATIVE_GATE_LU
        kept = z[(level > ABSOLUTE_GATE_LUFS) & (level > relative_gate)]
        return float(-0.691 + 10 * np.log10(kept.mean()))


def gain_for_loudness(x: np.ndarray, sr: int, target_lufs: float) -> float:
    """Amplitude gain that brings ``x`` to ``target_lufs`` (1.0 for a silent signal)."""
    loudness = integrated_loudness(x, sr)
    if not np.isfinite(loudness):
        return 1.0
    return float(10 ** ((target_lufs - loudness) / 20))
