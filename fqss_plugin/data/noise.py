"""Procedural background noise: the stand-in for WHAM! noise in ``noise/`` and ``mix_both``.

WHAM! records real cafés, bars and parks; here each noise is drawn from its own
seed as the sum of

* coloured Gaussian noise whose power spectrum falls as ``f ** -alpha``
  (``alpha`` uniform in [0, 2]: white to brown), with a random resonant band
  (a Gaussian bump of 1-2 octaves centred between 150 Hz and 3 kHz, +0-12 dB);
* with probability 0.3, mains hum: harmonics 1-5 of 50 or 60 Hz, 10-25 dB below
  the broadband part;
* slow loudness fluctuation: the sum is multiplied by ``1 + d m(t)``, ``m`` the
  linear interpolation of uniform [-1, 1] values drawn every 0.5 s and ``d`` in
  [0, 0.5].

It contains no speech, so ``mix_both`` stays a two-speaker separation task
with a stationary-ish background.  Its level is set by the mixer (LibriMix
draws noise loudness 5 LU below the speech range).
"""
from __future__ import annotations

import numpy as np
from scipy.fft import irfft, next_fast_len, rfftfreq

ALPHA_RANGE = (0.0, 2.0)
BAND_CENTRE_HZ = (150.0, 3000.0)
BAND_OCTAVES = (1.0, 2.0)
BAND_GAIN_DB = (0.0, 12.0)
HUM_PROBABILITY = 0.3
HUM_BELOW_DB = (10.0, 25.0)
MODULATION_DEPTH = (0.0, 0.5)
MODULATION_STEP_S = 0.5


def synthesize_noise(seed: int, n_samples: int, sr: int) -> np.ndarray:
    """``n_samples`` of background noise at ``sr`` Hz, unit RMS, float64; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    n_fft = next_fast_len(max(n_samples, 2), real=True)
    freqs = rfftfreq(n_fft, 1 / sr)
    f = np.maximum(freqs, 20.0)
    alpha = rng.uniform(*ALPHA_RANGE)
    centre = rng.uniform(*BAND_CENTRE_HZ)
    octaves = rng.uniform(*BAND_OCTAVES)
    band_gain = 10 ** (rng.uniform(*BAND_GAIN_DB) / 20)
    amplitude = f ** (-alpha / 2) * (1 + (band_gain - 1) * np.exp(-0.5 * (np.log2(f / centre) / (octaves / 2)) ** 2))
    spectrum = (rng.standard_normal(len(freqs)) + 1j * rng.standard_normal(len(freqs))) * amplitude
    noise = irfft(spectrum, n_fft)[:n_samples]
    noise /= np.sqrt(np.mean(noise**2)) + 1e-12
    t = np.arange(n_samples) / sr
    if rng.random() < HUM_PROBABILITY:
        mains = rng.choice([50.0, 60.0])
        hum = sum(rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 2 * np.pi))
                  for k in range(1, 6))
        hum *= 10 ** (-rng.uniform(*HUM_BELOW_DB) / 20) / (np.sqrt(np.mean(hum**2)) + 1e-12)
        noise = noise + hum
    knots = np.arange(0, n_samples / sr + MODULATION_STEP_S, MODULATION_STEP_S)
    slow = np.interp(t, knots, rng.uniform(-1, 1, len(knots)))
    noise = noise * (1 + rng.uniform(*MODULATION_DEPTH) * slow)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)
