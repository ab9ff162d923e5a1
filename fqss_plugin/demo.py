"""The main job (``make demo``): float vs vanilla QAT 8-bit vs FQSS 8-bit on the embedded Libri2Mix.

1. generate the embedded Libri2Mix (``fqss make-data speech``, deterministic; skipped if present);
2. load the shipped float ConvTasNet teacher through the recipes' pretrained-loading path;
3. run vanilla QAT and FQSS QAT with the Asteroid recipe (``recipes/LibriMix/ConvTasNet``);
4. score all three on the same test mixtures and print the table with *paired* deltas
   (quantized - float on the same mixture) and their 95 % confidence intervals;
5. write ``demo_results/results.json`` and ``demo_results/per_mixture.png``.

``benchmarks/paper_table.py`` runs the same :func:`compare` with longer budgets.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import torch

from .asteroid_recipe import RecipeError, load_model, parse_conf, score_test_set, train
from .data.speech import SpeechConfig, generate_speech

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "recipes" / "LibriMix" / "ConvTasNet" / "pretrained" / "embedded_float"
MODELS = ("float", "vanilla", "fqss")
LABELS = {"float": "Float", "vanilla": "Vanilla QAT 8-bit", "fqss": "FQSS 8-bit"}


def paired_delta(quantized: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean of ``quantized - reference`` per mixture and the half-width of its 95 % confidence interval."""
    deltas = torch.tensor(quantized) - torch.tensor(reference)
    half_width = 1.96 * float(deltas.std(unbiased=True)) / math.sqrt(len(deltas)) if len(deltas) > 1 else float("nan")
    return float(deltas.mean()), half_width


def si_sdri(rows: list[dict]) -> list[float]:
    return [row["si_sdr"] - row["input_si_sdr"] for row in rows]


def plot(results: dict, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = results["per_mixture_si_sdri"]["float"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, marker in (("vanilla", "x"), ("fqss", "o")):
        ax.scatter(reference, results["per_mixture_si_sdri"][name], s=14, marker=marker, alpha=0.7,
                   label=f"{LABELS[name]} ({results['delta_vs_float'][name]['mean']:+.2f} dB)")
    low, high = min(reference), max(reference)
    ax.plot([low, high], [low, high], "k--", lw=1, label="= float")
    ax.set_xlabel("float SI-SDRi per test mixture (dB)")
    ax.set_ylabel("quantized SI-SDRi (dB)")
    ax.set_title("Embedded Libri2Mix test split: quantized vs float")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(recipe: str, teacher: str, data: Path, out: Path, epochs: int, limit_train_batches: float = 1.0,
            extra_flags: tuple[str, ...] = ()) -> dict:
    """Vanilla and FQSS QAT of ``teacher`` with ``recipes/LibriMix/<recipe>``, scored with the float
    teacher on the same test mixtures: per-mixture SI-SDRi and paired deltas with 95 % CIs."""
    start = time.time()
    recipe_dir = REPO / "recipes" / "LibriMix" / recipe
    common = ["--data_dir", str(data / "data"), "--pretrained", teacher, "--epochs", str(epochs),
              "--limit_train_batches", str(limit_train_batches), *extra_flags]
    conf = None
    for mode in ("vanilla", "fqss"):
        print(f"-- {recipe}, {LABELS[mode]}: QAT from the float teacher {teacher}")
        conf = parse_conf(recipe_dir / "conf" / f"{mode}.yml", ["--exp_dir", str(out / mode), *common])
        train(conf, build_float=None)
    print(f"-- {recipe}: scoring float, vanilla and FQSS on the same test mixtures")
    sources = {"float": teacher, "vanilla": out / "vanilla" / "best_model.pth", "fqss": out / "fqss" / "best_model.pth"}
    rows = {name: score_test_set(load_model(source), conf, metrics=["si_sdr"], desc=LABELS[name])
            for name, source in sources.items()}
    per_mixture = {name: si_sdri(r) for name, r in rows.items()}
    results = {
        "recipe": recipe, "teacher": teacher, "test_mixtures": len(per_mixture["float"]), "qat_epochs": epochs,
        "limit_train_batches": limit_train_batches,
        "si_sdri_mean": {name: float(torch.tensor(v).mean()) for name, v in per_mixture.items()},
        "delta_vs_float": {},
        "per_mixture_si_sdri": per_mixture,
        "mixture_ids": [row["mixture_ID"] for row in rows["float"]],
    }
    for name in ("vanilla", "fqss"):
        mean, half = paired_delta(per_mixture[name], per_mixture["float"])
        results["delta_vs_float"][name] = {"mean": mean, "ci95": half}
    mean, half = paired_delta(per_mixture["fqss"], per_mixture["vanilla"])
    results["fqss_minus_vanilla"] = {"mean": mean, "ci95": half}
    results["wall_time_s"] = time.time() - start
    return results


def format_table(results: list[dict]) -> str:
    """The paper's table shape: Float | Vanilla QAT 8-bit | FQSS 8-bit, with paired deltas."""
    lines = ["| model | Float SI-SDRi | Vanilla QAT 8-bit | FQSS 8-bit | vanilla - float (95% CI) | "
             "FQSS - float (95% CI) | FQSS - vanilla (95% CI) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        m, d, fv = r["si_sdri_mean"], r["delta_vs_float"], r["fqss_minus_vanilla"]
        lines.append(f"| {r['recipe']} | {m['float']:.2f} | {m['vanilla']:.2f} | {m['fqss']:.2f} | "
                     f"{d['vanilla']['mean']:+.3f} ± {d['vanilla']['ci95']:.3f} | {d['fqss']['mean']:+.3f} ± "
                     f"{d['fqss']['ci95']:.3f} | {fv['mean']:+.3f} ± {fv['ci95']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "librimix", help="embedded data directory")
    parser.add_argument("--teacher", default=str(TEACHER), help="float teacher: directory, file or hub id")
    parser.add_argument("--out", type=Path, default=REPO / "demo_results")
    parser.add_argument("--epochs", type=int, default=3, help="QAT epochs for each of vanilla and FQSS")
    parser.add_argument("--limit_train_batches", type=float, default=1.0)
    args = parser.parse_args(argv)
    start = time.time()
    try:
        if not (args.data / "data" / "wav8k" / "min" / "test").is_dir():
            print(f"generating the embedded Libri2Mix in {args.data}")
            generate_speech(SpeechConfig(out=args.data))
        results = compare("ConvTasNet", args.teacher, args.data, args.out, args.epochs, args.limit_train_batches)
    except (RecipeError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    results["wall_time_s"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "per_mixture.png")
    print(f"\nSI-SDRi on the embedded test split ({results['test_mixtures']} mixtures; synthetic voices, "
          "not LibriMix numbers), paired deltas per mixture:\n")
    print(format_table([results]))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'per_mixture.png'}; "
          f"wall time {results['wall_time_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
