"""Fine-tune a float ConvTasNet teacher with dynamic mixing: every batch draws new pairs of voices.

A pool of single-voice recordings (``<pool>/<kind>/<speaker>_<n>.flac``, e.g. the sources of a
``fqss make-data speech --real-speech`` train split, real and synthetic) is mixed on the fly: two voices of
different speakers, random ``--segment`` crops, a random level difference of up to ``--level_db``, PIT SI-SDR
loss (Asteroid's ``PITLossWrapper``). The learning rate follows a cosine from ``--lr`` to ``lr/100`` over
``--seconds`` of wall time, so the run ends annealed whatever the machine's speed. Asteroid packages are
written to ``--out`` every ``--save_every`` seconds and at the end, so a run stopped early leaves a model.

    python train_dynamic_mixing.py --pool POOL --init pretrained/embedded_float/best_model.pth \\
        --out exp/dynamic_mixing --seconds 420 --device cuda

The pool comes from a generated train split (`local/voice_pool.py`); any folder of that layout works.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from asteroid.losses import PITLossWrapper, pairwise_neg_sisdr
from asteroid.models import ConvTasNet


def load_pool(pool: Path, rate: int) -> tuple[list[np.ndarray], list[str]]:
    voices, speakers = [], []
    for path in sorted(pool.rglob("*.flac")) + sorted(pool.rglob("*.wav")):
        wav, file_rate = sf.read(path, dtype="float32", always_2d=True)
        if file_rate != rate:
            raise ValueError(f"{path}: {file_rate} Hz, expected {rate} Hz")
        voices.append(wav[:, 0])
        speakers.append(path.parent.name + "/" + path.stem.rsplit("_", 1)[0])
    if len(set(speakers)) < 2:
        raise ValueError(f"{pool}: needs recordings of at least two speakers")
    return voices, speakers


def crop(wav: np.ndarray, length: int, rng: random.Random) -> np.ndarray:
    if len(wav) <= length:
        start = rng.randrange(length - len(wav) + 1)
        return np.pad(wav, (start, length - len(wav) - start))
    start = rng.randrange(len(wav) - length + 1)
    return wav[start:start + length]


def batch(voices, speakers, size: int, length: int, level_db: float, rng: random.Random) -> torch.Tensor:
    """``[size, 2, length]`` sources: two different speakers, unit RMS, then a random level difference."""
    out = np.zeros((size, 2, length), np.float32)
    for b in range(size):
        first = rng.randrange(len(voices))
        second = rng.randrange(len(voices))
        while speakers[second] == speakers[first]:
            second = rng.randrange(len(voices))
        for k, index in enumerate((first, second)):
            source = crop(voices[index], length, rng)
            out[b, k] = source / (np.sqrt(np.mean(source ** 2)) + 1e-8)
        out[b, 1] *= 10 ** (rng.uniform(-level_db, level_db) / 20)
        out[b] *= rng.uniform(0.05, 0.5) / (np.abs(out[b].sum(0)).max() + 1e-8)
    return torch.from_numpy(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--init", type=Path, required=True, help="Asteroid ConvTasNet package to start from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=420.0)
    parser.add_argument("--save_every", type=float, default=60.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--segment", type=float, default=3.0)
    parser.add_argument("--level_db", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = ConvTasNet.from_pretrained(str(args.init)).to(args.device).train()
    voices, speakers = load_pool(args.pool, model.sample_rate)
    print(f"{len(voices)} recordings of {len(set(speakers))} speakers, {sum(map(len, voices)) / model.sample_rate / 60:.1f} min")
    loss_fn = PITLossWrapper(pairwise_neg_sisdr, pit_from="pw_mtx")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    length = int(args.segment * model.sample_rate)
    start = last_save = time.time()
    step, recent = 0, []
    while (elapsed := time.time() - start) < args.seconds:
        for group in optimizer.param_groups:                 # cosine from lr to lr / 100 over the wall-time budget
            group["lr"] = args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * elapsed / args.seconds)))
        sources = batch(voices, speakers, args.batch_size, length, args.level_db, rng).to(args.device)
        loss = loss_fn(model(sources.sum(1)), sources)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        recent.append(float(loss))
        step += 1
        if time.time() - last_save > args.save_every:
            print(f"step {step}, {elapsed:.0f} s, train SI-SDR {-np.mean(recent):.2f} dB, lr {optimizer.param_groups[0]['lr']:.2e}",
                  flush=True)
            recent, last_save = [], time.time()
            torch.save(model.serialize(), args.out / "best_model.pth")
    torch.save(model.serialize(), args.out / "best_model.pth")
    print(f"done: {step} steps in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
