"""The main job (``make demo``): float vs vanilla QAT 8-bit vs FQSS 8-bit on the embedded Libri2Mix.

1. generate the embedded Libri2Mix (``fqss make-data speech``, deterministic; skipped if present);
2. load the shipped float ConvTasNet teacher through the recipes' pretrained-loading path;
3. run vanilla QAT and FQSS QAT with the Asteroid recipe (``recipes/LibriMix/ConvTasNet``), and
   "Float +": the float teacher fine-tuned in float for the same steps at the same learning rate,
   the fair reference when the teacher is not converged (QAT then also goes on training it);
4. score all four on the same test mixtures and print the table with *paired* deltas
   (quantized - float on the same mixture) and their 95 % confidence intervals;
5. write ``demo_results/results.json`` and ``demo_results/per_mixture.png``.

``benchmarks/paper_table.py`` runs the same :func:`compare` with longer budgets.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import matplotlib
import torch
import yaml

from .asteroid import resolve_package
from .asteroid.recipe import RecipeError, load_model, parse_conf, score_test_set
from .data.speech import SpeechConfig, generate_speech

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "recipes" / "LibriMix" / "ConvTasNet" / "pretrained" / "embedded_float"
MODELS = ("float", "float_more", "vanilla", "fqss")
LABELS = {"float": "Float", "float_more": "Float +", "vanilla": "Vanilla QAT 8-bit", "fqss": "FQSS 8-bit"}


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


def fine_tune(recipe: str, conf_name: str, teacher: str, data: Path, exp_dir: Path, epochs: int,
              limit_train_batches: float = 1.0, flags: tuple[str, ...] = ()) -> dict:
    """Train ``recipes/LibriMix/<recipe>/conf/<conf_name>.yml`` from the float ``teacher``; its conf.

    A finished or interrupted run in ``exp_dir`` is resumed (or reused) only if it was made with the
    same conf; one made with another (an edited recipe, another fqss version) is trained afresh.
    """
    conf = parse_conf(REPO / "recipes" / "LibriMix" / recipe / "conf" / f"{conf_name}.yml",
                      ["--exp_dir", str(exp_dir), "--data_dir", str(data / "data"), "--pretrained", teacher,
                       "--epochs", str(epochs), "--limit_train_batches", str(limit_train_batches), *flags])
    previous = exp_dir / "conf.yml"
    if previous.is_file() and yaml.safe_load(previous.read_text()) != conf:
        print(f"{exp_dir}: made with another conf (an edited recipe or fqss version); training it afresh")
        shutil.rmtree(exp_dir)
    recipe_train(recipe)(conf)
    return conf


def recipe_train(recipe: str):
    """The ``main(conf)`` of ``recipes/LibriMix/<recipe>/train.py``: the demo trains through the recipe itself."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}_train", REPO / "recipes" / "LibriMix" / recipe /
                                                  "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def score(sources: dict[str, str | Path], conf: dict) -> tuple[dict[str, list[float]], list[str]]:
    """Per-mixture SI-SDRi of every model in ``sources`` on the test split, and the mixture ids."""
    rows = {name: score_test_set(load_model(source), conf, metrics=["si_sdr"], desc=LABELS.get(name, name))
            for name, source in sources.items()}
    return {name: si_sdri(r) for name, r in rows.items()}, [row["mixture_ID"] for row in next(iter(rows.values()))]


RUNS = ("vanilla", "fqss", "float_more")


def teacher_fingerprint(teacher: str) -> str:
    """SHA-256 of the teacher package's weights (a local package or a hub id)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(resolve_package(teacher)["state_dict"].items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def discard_runs_of_another_teacher(teacher: str, out: Path, runs: tuple[str, ...] = RUNS) -> None:
    """The recipe resumes a run from its ``last.ckpt``; a run made from other teacher weights (or
    from unrecorded ones) is removed instead, so the comparison never mixes two teachers."""
    stamp, fingerprint = out / "teacher.sha256", teacher_fingerprint(teacher)
    recorded = stamp.read_text().strip() if stamp.is_file() else None
    stale = [out / run for run in runs if (out / run).exists() and recorded != fingerprint]
    if stale:
        print(f"-- {out}: its runs were made from another teacher; starting {', '.join(p.name for p in stale)} afresh")
        for run in stale:
            shutil.rmtree(run)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")


def compare(recipe: str, teacher: str, data: Path, out: Path, epochs: int, limit_train_batches: float = 1.0,
            extra_flags: tuple[str, ...] = ()) -> dict:
    """Vanilla and FQSS QAT of ``teacher`` with ``recipes/LibriMix/<recipe>``, and the teacher
    fine-tuned in float for as long at the QAT learning rate ("Float +"), all scored with the float
    teacher on the same test mixtures: per-mixture SI-SDRi and paired deltas with 95 % CIs."""
    start = time.time()
    discard_runs_of_another_teacher(teacher, out)
    conf = None
    for mode in ("vanilla", "fqss"):
        print(f"-- {recipe}, {LABELS[mode]}: QAT from the float teacher {teacher}")
        conf = fine_tune(recipe, mode, teacher, data, out / mode, epochs, limit_train_batches, extra_flags)
    print(f"-- {recipe}, {LABELS['float_more']}: the float teacher fine-tuned as long, at the QAT learning rate")
    fine_tune(recipe, "float", teacher, data, out / "float_more", epochs, limit_train_batches,
              (*extra_flags, "--lr", str(conf["optim"]["lr"])))
    print(f"-- {recipe}: scoring float, float +, vanilla and FQSS on the same test mixtures")
    per_mixture, mixture_ids = score({"float": teacher, "float_more": out / "float_more" / "best_model.pth",
                                      "vanilla": out / "vanilla" / "best_model.pth",
                                      "fqss": out / "fqss" / "best_model.pth"}, conf)
    results = {
        "recipe": recipe, "teacher": teacher, "test_mixtures": len(per_mixture["float"]), "qat_epochs": epochs,
        "limit_train_batches": limit_train_batches,
        "si_sdri_mean": {name: float(torch.tensor(v).mean()) for name, v in per_mixture.items()},
        "delta_vs_float": {},
        "per_mixture_si_sdri": per_mixture,
        "mixture_ids": mixture_ids,
    }
    results["delta_vs_float_more"] = {}
    for name in ("vanilla", "fqss"):
        for reference in ("float", "float_more"):
            mean, half = paired_delta(per_mixture[name], per_mixture[reference])
            results[f"delta_vs_{reference}"][name] = {"mean": mean, "ci95": half}
    mean, half = paired_delta(per_mixture["float_more"], per_mixture["float"])
    results["delta_vs_float"]["float_more"] = {"mean": mean, "ci95": half}
    mean, half = paired_delta(per_mixture["fqss"], per_mixture["vanilla"])
    results["fqss_minus_vanilla"] = {"mean": mean, "ci95": half}
    results["delta_vs_float_by_half"] = delta_by_half(per_mixture)
    results["wall_time_s"] = time.time() - start
    return results


def delta_by_half(per_mixture: dict[str, list[float]]) -> dict:
    """Paired deltas vs float on the mixtures below / above the float model's median SI-SDRi: the
    paper finds quantization hurts most where the float model is best (8-bit noise caps the SDR)."""
    reference = torch.tensor(per_mixture["float"])
    upper = reference > reference.median()
    out = {}
    for name in ("vanilla", "fqss"):
        values = torch.tensor(per_mixture[name])
        out[name] = {}
        for half, mask in (("lower", ~upper), ("upper", upper)):
            mean, ci = paired_delta(values[mask].tolist(), reference[mask].tolist())
            out[name][half] = {"mean": mean, "ci95": ci}
    return out


def format_table(results: list[dict]) -> str:
    """The paper's table shape, Float | Vanilla QAT 8-bit | FQSS 8-bit, plus the "Float +" reference,
    with paired deltas (± the 95 % CI half-width)."""
    def delta(d: dict) -> str:
        return f"{d['mean']:+.3f} ± {d['ci95']:.3f}"

    lines = ["| model | Float SI-SDRi | Float + | Vanilla QAT 8-bit | FQSS 8-bit | vanilla - float | FQSS - float | "
             "vanilla - float + | FQSS - float + | FQSS - vanilla |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, d, dm = r["si_sdri_mean"], r["delta_vs_float"], r["delta_vs_float_more"]
        lines.append(f"| {r['recipe']} | {m['float']:.2f} | {m['float_more']:.2f} | {m['vanilla']:.2f} | "
                     f"{m['fqss']:.2f} | {delta(d['vanilla'])} | {delta(d['fqss'])} | {delta(dm['vanilla'])} | "
                     f"{delta(dm['fqss'])} | {delta(r['fqss_minus_vanilla'])} |")
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
    halves = results["delta_vs_float_by_half"]
    print("\nquantized - float on the mixtures below | above the float median SI-SDRi: " + "; ".join(
        f"{LABELS[name]} {halves[name]['lower']['mean']:+.3f} ± {halves[name]['lower']['ci95']:.3f} | "
        f"{halves[name]['upper']['mean']:+.3f} ± {halves[name]['upper']['ci95']:.3f}" for name in ("vanilla", "fqss")))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'per_mixture.png'}; "
          f"wall time {results['wall_time_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
