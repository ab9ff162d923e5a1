"""Single-voice recordings for dynamic mixing (``train_dynamic_mixing.py``), taken from a LibriMix train split.

Each source of a ``mixture_<split>_mix_clean.csv`` (the voices ``fqss make-data speech --real-speech`` wrote, with
their augmentation) is one speaker's utterance. This picks up to ``--per_speaker`` of them per speaker (the first
``--max_seconds`` of each), real speakers (id >= 10000, ``real_speakers.csv``) and synthetic ones, until each kind
has its minutes, in a seeded order, and writes ``<out>/<real|synth>/<speaker>_<n>.flac``.

    python local/voice_pool.py --metadata DATA/Libri2Mix/wav8k/min/metadata/mixture_train-360_mix_clean.csv \\
        --out POOL --real_minutes 45 --synth_minutes 25
"""
import argparse
import csv
import random
from pathlib import Path

import numpy as np
import soundfile as sf

REAL_SPEAKER_IDS = 10000
"""``fqss make-data speech --real-speech`` numbers real speakers from here (synthetic voices stay below)."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--real_minutes", type=float, default=45)
    parser.add_argument("--synth_minutes", type=float, default=25)
    parser.add_argument("--per_speaker", type=int, default=3)
    parser.add_argument("--max_seconds", type=float, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = list(csv.DictReader(open(args.metadata)))
    random.Random(args.seed).shuffle(rows)
    budget = {"real": args.real_minutes * 60, "synth": args.synth_minutes * 60}
    used, count = {"real": 0.0, "synth": 0.0}, {}
    for row in rows:
        ids = row["mixture_ID"].split("_")
        for k, speaker in ((1, ids[0].split("-")[0]), (2, ids[1].split("-")[0])):
            kind = "real" if int(speaker) >= REAL_SPEAKER_IDS else "synth"
            if used[kind] >= budget[kind] or count.get(speaker, 0) >= args.per_speaker:
                continue
            wav, rate = sf.read(row[f"source_{k}_path"], dtype="float32")
            wav = wav[: int(rate * args.max_seconds)]
            if np.abs(wav).max() < 1e-4:
                continue
            (args.out / kind).mkdir(parents=True, exist_ok=True)
            sf.write(args.out / kind / f"{speaker}_{count.get(speaker, 0)}.flac", wav, rate, subtype="PCM_16")
            count[speaker] = count.get(speaker, 0) + 1
            used[kind] += len(wav) / rate
    real = sum(int(s) >= REAL_SPEAKER_IDS for s in count)
    print(f"{used['real'] / 60:.1f} min of {real} real speakers, {used['synth'] / 60:.1f} min of {len(count) - real} "
          f"synthetic ones in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
