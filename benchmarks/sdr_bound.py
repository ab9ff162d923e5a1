"""The SDR bound of b-bit signals beside each shipped float model, and what it says (``fqss analyze``'s first plot).

For every shipped float teacher, the bound that one b-bit input and one b-bit output put on the SDR
(:func:`fqss_plugin.analysis.signal_bound_db`: ``6.02 b + 4.77 - crest factor``, median over the signals) and
the model's measured SDR with its input and output on b bits (:func:`~fqss_plugin.analysis.signal_io_on_bits`),
for b = 4..16; the curve and :func:`~fqss_plugin.analysis.reading` say from how many bits the signal path
stops limiting the model, i.e. what the FQSS input splitter and output combiner have to carry.

* Speech (ConvTasNet, DPTNet: Asteroid packages; SepFormer: SpeechBrain package), the embedded Libri2Mix test
  mixtures, SI-SDR: :func:`fqss_plugin.analysis.analyze`.
* Music (ConvTasNet, HTDemucs), the toy MUSDB18-HQ validation tracks through the recipe's own validation
  (``apply_model``, whole tracks), nSDR; bounds per channel of the mixtures and the stems.

Writes ``docs/figures/sdr_bound_<model>.png`` and the section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import command_line, publish  # noqa: E402
from fqss_plugin.analysis import (BITS, analyze, bounds, plot, reading, read_mixtures,  # noqa: E402
                                  signal_io_on_bits)
from fqss_plugin.export.cpu import describe_cpu  # noqa: E402

FIGURES = ROOT / "docs" / "figures"
SPEECH_TEST = ROOT / "data" / "librimix" / "data" / "wav8k" / "min" / "test" / "mixture_test_mix_clean.csv"
MUSIC = {"ConvTasNet": "recipes/MUSDB18/ConvTasNet/pretrained/embedded_float/best_model.pth",
         "HTDemucs": "recipes/MUSDB18/HTDemucs/pretrained/embedded_float/best.th"}


def speech_models() -> dict:
    """``{name: (loader, package)}`` of the shipped speech teachers."""
    from benchmarks.int8_dual_path import dptnet, sepformer
    from benchmarks.int8_runtime import load_teacher
    return {"ConvTasNet": (lambda: load_teacher(None)[0], "recipes/LibriMix/ConvTasNet/pretrained/embedded_float"),
            "DPTNet": (lambda: dptnet()[0], "recipes/LibriMix/DPTNet/pretrained/embedded_float"),
            "SepFormer": (lambda: sepformer()[0], "recipes/LibriMix/SepFormer/pretrained/embedded_float")}


def music_result(recipe: str, package: Path, musdb: Path, bits: tuple[int, ...]) -> dict:
    """:func:`analyze`'s bound and measured curve for a music recipe's float package (nSDR, validation tracks)."""
    from benchmarks.music_sensitivity import recipe_module
    from fqss_plugin.demucs.recipe import load_conf, make_datasets, validate
    recipe_dir = ROOT / "recipes" / "MUSDB18" / recipe
    conf = load_conf([str(recipe_dir / "conf" / "float.yaml"), f"dset.musdb={musdb.resolve()}",
                      f"dset.metadata={recipe_dir / 'metadata'}", f"pretrained={package.resolve()}"])
    model = recipe_module(recipe).build_models(conf)[0].eval()
    _, valid_set = make_datasets(conf)
    tracks = [valid_set[i] for i in range(len(valid_set))]
    mixtures = [channel.numpy() for mixture, *_ in tracks for channel in mixture]
    stems = [channel.numpy() for _, *sources in tracks for stem in sources for channel in stem if channel.any()]
    measured = {}
    with torch.no_grad():
        for b in bits:
            with signal_io_on_bits(model, b):
                measured[b] = validate(model, valid_set)
    return {"mixtures": len(tracks), "metric": "nSDR", **bounds(mixtures, stems, bits), "measured_db": measured}


def figure(result: dict, name: str, title: str) -> Path:
    """``plot``'s SDR-vs-bits PNG of ``result`` as ``docs/figures/sdr_bound_<name>.png``."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        drawn = plot({**result, "title": title}, Path(scratch))[0]
        target = FIGURES / f"sdr_bound_{name}.png"
        shutil.copyfile(drawn, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speech-mixtures", type=int, default=40, help="embedded test mixtures per speech model")
    parser.add_argument("--musdb", type=Path, default=ROOT / "data" / "musdb18hq")
    parser.add_argument("--models", nargs="+", default=["speech/ConvTasNet", "speech/DPTNet", "speech/SepFormer",
                                                        "music/ConvTasNet", "music/HTDemucs"])
    parser.add_argument("--no-write", action="store_true", help="print the section; leave BENCHMARKS.md and the "
                                                                "figures alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    speech = speech_models()
    mixtures = None
    rows, readings = [], []
    for entry in args.models:
        kind, name = entry.split("/")
        if kind == "speech":
            load, package = speech[name]
            mixtures = mixtures or read_mixtures(SPEECH_TEST, args.speech_mixtures)
            result = analyze(load(), mixtures, sensitivity=False)
            data = f"{len(mixtures)} embedded Libri2Mix test mixtures"
        else:
            package = MUSIC[name]
            result = music_result(name, ROOT / package, args.musdb, BITS)
            data = f"{result['mixtures']} toy MUSDB18-HQ validation tracks"
        label = f"{name} ({kind})"
        slug = f"{kind}_{name.lower()}"
        measured = {int(b): v for b, v in result["measured_db"].items()}
        path = f"docs/figures/sdr_bound_{slug}.png"
        if not args.no_write:
            figure(result, slug, f"{label}: SDR bound of b-bit signals vs measured {result['metric']}")
        rows.append(f"| {label} | `{package}` | {data} | {result['bound_db']['input'][8]:.1f} | "
                    f"{result['bound_db']['output'][8]:.1f} | {measured[8]:.2f} | {measured[max(measured)]:.2f} | "
                    f"[{Path(path).name}]({path}) |")
        readings.append(f"* **{label}**: {reading(result)}")
        print(rows[-1], readings[-1], sep="\n", flush=True)
    body = (f"Command: `{command_line()}`\n\nCPU: {describe_cpu()}\n\nEach shipped float teacher with its input and "
            "output on b uniform levels over their own peak (b = 4..16; speech: median SI-SDR over the mixtures, music: "
            "mean nSDR over tracks and stems), beside the bound one b-bit signal puts on the SDR (median over the "
            "signals, `6.02 b + 4.77 - crest factor`). The plots are `fqss analyze`'s `sdr_vs_bits.png`. Both use each "
            "signal's own peak, as FQSS's normalised input does; one learned range for all inputs (vanilla QAT's single "
            "input quantizer) leaves quiet mixtures fewer levels than b.\n\n"
            "| model | package | data | 8-bit input bound (dB) | 8-bit output bound (dB) | measured, 8-bit signals | "
            "measured, 16-bit signals | plot |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
            "\n\nReading:\n\n" + "\n".join(readings) + "\n")
    publish("SDR bound of b-bit signals (shipped float models)", body, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
