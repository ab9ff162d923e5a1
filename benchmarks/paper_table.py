"""The paper's table on the embedded Libri2Mix: Float | Vanilla QAT 8-bit | FQSS 8-bit per model.

Same procedure as ``make demo`` (:func:`fqss_plugin.demo.compare`) with longer QAT budgets:
vanilla and FQSS QAT of each float teacher, then all three scored on the same test mixtures, with
paired per-mixture deltas and 95 % confidence intervals. Writes its section of BENCHMARKS.md.

    python benchmarks/paper_table.py --teacher ConvTasNet=recipes/LibriMix/ConvTasNet/pretrained/embedded_float \\
        --teacher DPTNet=recipes/LibriMix/DPTNet/exp/float --epochs 10 --recipe-epochs DPTNet=2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import command_line, write_section  # noqa: E402
from fqss_plugin.demo import TEACHER, compare, format_table  # noqa: E402

GOALS = {"ConvTasNet": -0.05, "DPTNet": -0.10}


def recipe_pair(parser: argparse.ArgumentParser, text: str, flag: str, kind=str) -> tuple[str, object]:
    """``RECIPE=VALUE`` -> (recipe, value), or a usage error naming the flag."""
    recipe, sep, value = text.partition("=")
    try:
        if not (sep and recipe and value):
            raise ValueError
        value = kind(value)
        # a local teacher by its absolute path: the runs record it, and relative or absolute spellings are one run
        return recipe, str(Path(value).resolve()) if kind is str and Path(value).exists() else value
    except ValueError:
        parser.error(f"{flag} {text!r}: expected RECIPE={'N (an integer)' if kind is int else 'PATH'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", action="append", default=None, metavar="RECIPE=PATH",
                        help="float teacher per recipe (repeatable); default: the shipped ConvTasNet teacher")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "librimix")
    parser.add_argument("--out", type=Path, default=REPO / "exp" / "paper_table")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--recipe-epochs", action="append", default=[], metavar="RECIPE=N",
                        help="QAT epochs of one recipe instead of --epochs (repeatable; DPTNet's QLSTM is slow on a CPU)")
    parser.add_argument("--limit_train_batches", type=float, default=1.0)
    args = parser.parse_args(argv)
    teachers = dict(recipe_pair(parser, t, "--teacher") for t in args.teacher) if args.teacher else \
        {"ConvTasNet": str(TEACHER)}
    epochs = {recipe: n for recipe, n in (recipe_pair(parser, e, "--recipe-epochs", int) for e in args.recipe_epochs)}
    results = [compare(recipe, teacher, args.data, args.out / recipe, epochs.get(recipe, args.epochs),
                       args.limit_train_batches) for recipe, teacher in teachers.items()]
    (args.out / "paper_table.json").write_text(json.dumps(results, indent=2))
    verdicts = []
    for r in results:
        goal = GOALS.get(r["recipe"])
        fqss, gap = r["delta_vs_float"]["fqss"], r["fqss_minus_vanilla"]
        met = goal is not None and fqss["mean"] >= goal
        separated = gap["mean"] - gap["ci95"] > 0
        verdicts.append(f"* {r['recipe']}: FQSS - float = {fqss['mean']:+.3f} dB (goal >= {goal:+.2f}: "
                        f"{'met' if met else 'NOT met'}); FQSS better than vanilla (paired 95% CI of FQSS - vanilla above 0): "
                        f"{'yes' if separated else 'no'}; {r['qat_epochs']} QAT epochs each; this invocation "
                        f"{r['wall_time_s'] / 60:.0f} min (runs it found finished with the same conf are reused).")
    body = (f"Command: `{command_line()}`\n\nSI-SDRi (dB) on the embedded Libri2Mix test split "
            f"({results[0]['test_mixtures']} mixtures; synthetic voices: not LibriMix numbers). Deltas are paired "
            "per mixture, ± the half-width of the 95% confidence interval.\n\n" + format_table(results) + "\n\n"
            + "\n".join(verdicts))
    print(body)
    write_section("Paper table (embedded Libri2Mix)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
