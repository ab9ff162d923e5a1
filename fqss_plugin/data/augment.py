"""Realism augmentation of the two voices of a mixture (``fqss make-data speech --augment``).

Applied to each speech source at 16 kHz before the LibriMix gains (so the sources written to
``s1``/``s2`` are the augmented ones and every mixture is still their exact sum), with every
parameter drawn from ``numpy.random.default_rng(seed)`` (one seed per mixture, drawn in the
planning pass, so the output does not depend on ``--jobs``):

1. **speed** (probability :data:`SPEED_PROBABILITY`): Kaldi-style speed perturbation by a
   factor in :data:`SPEED_RANGE` (tempo and pitch together), as a
   ``torchaudio.functional.resample`` from ``16000 * factor`` Hz (factor rounded to 1/160) to 16 kHz;
2. **pitch** (probability :data:`PITCH_PROBABILITY`): ``librosa.effects.pitch_shift`` by
   :data:`PITCH_SEMITONES` semitones at constant tempo;
3. **EQ**: with probability 0.5 a high-pass at 50-250 Hz, with probability 0.35 a low-pass at
   3-7.5 kHz (band-limited microphones, telephones), and 0-3 peaking filters (150 Hz-5 kHz,
   +-8 dB, Q 0.5-2) (``torchaudio.functional`` biquads);
4. **room** (probability :data:`ROOM_PROBABILITY`, one room per mixture): both talkers and one
   microphone in a shoebox room (3-10 x 3-8 x 2.4-4 m, RT60 :data:`RT60_RANGE`, raised where the
   room is too large to be that dry), impulse
   responses by the image source method of ``pyroomacoustics`` (order capped at
   :data:`MAX_IMAGE_ORDER`), convolved with ``scipy.signal.fftconvolve`` and advanced so
   that the direct path stays in place;
5. **microphone noise** (probability :data:`SELF_NOISE_PROBABILITY`): a background from
   :func:`fqss_plugin.data.noise.synthesize_noise` at :data:`SELF_NOISE_SNR_DB` below the
   source, part of the source (a recording's own noise floor).

Level variation comes from the wider loudness ranges the planner draws in augmented splits
(:data:`AUGMENTED_SPEECH_LUFS`, :data:`AUGMENTED_NOISE_LUFS`); the separate ``noise`` source
keeps its own per-mixture random colour, hum and modulation (:mod:`fqss_plugin.data.noise`).
"""
from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

from fqss_plugin.data.errors import DataGenerationError
from fqss_plugin.data.noise import synthesize_noise

SPEED_PROBABILITY = 0.8
SPEED_RANGE = (0.9, 1.1)
PITCH_PROBABILITY = 0.6
PITCH_SEMITONES = (-2.0, 2.0)
ROOM_PROBABILITY = 0.7
RT60_RANGE = (0.15, 0.7)
ROOM_SIZE = ((3.0, 10.0), (3.0, 8.0), (2.4, 4.0))
MAX_IMAGE_ORDER = 25
WALL_MARGIN_M = 0.5
MIN_DISTANCE_M = 0.5
SELF_NOISE_PROBABILITY = 0.5
SELF_NOISE_SNR_DB = (25.0, 45.0)
AUGMENTED_SPEECH_LUFS = (-36.0, -22.0)
AUGMENTED_NOISE_LUFS = (-45.0, -28.0)
EQ_HEADROOM = 0.25


def require_room_simulator() -> None:
    """Raise :class:`DataGenerationError` if ``pyroomacoustics`` (the RIR simulator) is missing."""
    try:
        import pyroomacoustics  # noqa: F401
    except ImportError:
        raise DataGenerationError("--augment needs pyroomacoustics for room impulse responses: "
                                  "`pip install pyroomacoustics` (it is in setup.cfg)") from None


def _speed(x: np.ndarray, sr: int, factor: float) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    orig = int(round(sr * factor / 100)) * 100
    return AF.resample(torch.from_numpy(x), orig, sr).numpy()


def _pitch(x: np.ndarray, sr: int, semitones: float) -> np.ndarray:
    import librosa

    return librosa.effects.pitch_shift(x, sr=sr, n_steps=semitones).astype(np.float64)


def _eq(x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    highpass = float(rng.uniform(50, 250)) if rng.random() < 0.5 else None
    lowpass = float(rng.uniform(3000, 7500)) if rng.random() < 0.35 else None
    peaks = [(float(np.exp(rng.uniform(np.log(150), np.log(5000)))), float(rng.uniform(-8, 8)),
              float(rng.uniform(0.5, 2.0))) for _ in range(int(rng.integers(0, 4)))]
    peak = float(np.max(np.abs(x)))
    if peak == 0:
        return x
    y = torch.from_numpy(x * (EQ_HEADROOM / peak))  # the biquads clamp to [-1, 1]: keep headroom for boosts
    if highpass is not None:
        y = AF.highpass_biquad(y, sr, highpass)
    if lowpass is not None:
        y = AF.lowpass_biquad(y, sr, lowpass)
    for centre, gain, q in peaks:
        y = AF.equalizer_biquad(y, sr, centre, gain, q)
    return y.numpy() * (peak / EQ_HEADROOM)


def _room_impulse_responses(rng: np.random.Generator, sr: int, n_sources: int) -> list[np.ndarray]:
    import pyroomacoustics as pra

    size = np.array([rng.uniform(*r) for r in ROOM_SIZE])
    rt60 = float(rng.uniform(*RT60_RANGE))

    def position() -> np.ndarray:
        return np.array([rng.uniform(WALL_MARGIN_M, s - WALL_MARGIN_M) for s in size[:2]]
                        + [rng.uniform(1.0, min(2.0, size[2] - WALL_MARGIN_M))])

    mic = position()
    sources = []
    for _ in range(n_sources):
        candidate = position()
        for _ in range(20):
            if np.linalg.norm(candidate - mic) >= MIN_DISTANCE_M:
                break
            candidate = position()
        sources.append(candidate)
    while True:  # a large room cannot be as dry as drawn (absorption > 1): lengthen RT60 until it can
        try:
            absorption, max_order = pra.inverse_sabine(rt60, size)
            break
        except ValueError:
            rt60 *= 1.1
    room = pra.ShoeBox(size, fs=sr, materials=pra.Material(absorption), max_order=min(max_order, MAX_IMAGE_ORDER))
    for source in sources:
        room.add_source(source)
    room.add_microphone(mic)
    room.compute_rir()
    rirs = []
    for rir in room.rir[0]:
        rir = np.asarray(rir, dtype=np.float64)
        start = max(0, int(np.argmax(np.abs(rir))) - 32)
        rirs.append(rir[start:])
    return rirs


def augment_voices(voices: list[np.ndarray], sr: int, seed: int) -> list[np.ndarray]:
    """The augmented versions of the speech sources ``voices`` of one mixture (module docstring)."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in voices:
        plans.append({
            "speed": float(rng.uniform(*SPEED_RANGE)) if rng.random() < SPEED_PROBABILITY else None,
            "pitch": float(rng.uniform(*PITCH_SEMITONES)) if rng.random() < PITCH_PROBABILITY else None,
            "eq_seed": int(rng.integers(2**31)),
            "noise": (float(rng.uniform(*SELF_NOISE_SNR_DB)), int(rng.integers(2**31)))
            if rng.random() < SELF_NOISE_PROBABILITY else None,
        })
    room = rng.random() < ROOM_PROBABILITY
    room_seed = int(rng.integers(2**31))
    out = []
    for x, plan in zip(voices, plans):
        y = np.asarray(x, dtype=np.float64)
        if plan["speed"] is not None:
            y = _speed(y, sr, plan["speed"])
        if plan["pitch"] is not None:
            y = _pitch(y, sr, plan["pitch"])
        y = _eq(y, sr, np.random.default_rng(plan["eq_seed"]))
        out.append(y)
    if room:
        rirs = _room_impulse_responses(np.random.default_rng(room_seed), sr, len(out))
        out = [fftconvolve(y, rir)[: len(y) + len(rir) // 4] for y, rir in zip(out, rirs)]
    for index, plan in enumerate(plans):
        if plan["noise"] is not None:
            snr, noise_seed = plan["noise"]
            y = out[index]
            rms = float(np.sqrt(np.mean(y**2)))
            out[index] = y + synthesize_noise(noise_seed, len(y), sr) * rms * 10 ** (-snr / 20)
    return out
