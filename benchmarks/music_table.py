"""The paper's music rows on the toy MUSDB18-HQ: Float | Float + | Vanilla QAT 8-bit | FQSS 8-bit per model.

For each ``--teacher RECIPE=PACKAGE`` (a float model of ``recipes/MUSDB18/<RECIPE>``), the recipe itself runs
"Float +" (the teacher trained on in float for the same epochs at the QAT learning rate), vanilla QAT and FQSS
QAT, each for ``--epochs`` (runs resume from their checkpoints, so an interrupted table goes on). All four are
scored with museval on the same test tracks with ``test.shifts=0`` (deterministic chunked inference), and the
deltas are paired per track and source (the track's median SDR over 1 s frames), with 95 % confidence
intervals. Writes ``<out>/music_table.json`` and its section of BENCHMARKS.md; rows of recipes that an
invocation does not name are kept from that file (each row names the command and epoch count that made it), so
one model's row can be re-run at more epochs without retraining the others.

    python benchmarks/music_table.py --teacher HTDemucs=recipes/MUSDB18/HTDemucs/pretrained/embedded_float/<sig>.th \\
        --teacher ConvTasNet=recipes/MUSDB18/ConvTasNet/pretrained/embedded_float/best_model.pth --epochs 4
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import command_line, publish, repo_path  # noqa: E402
from fqss_plugin.export.cpu import describe_cpu  # noqa: E402

RUNS = {"float_more": "float.yaml", "vanilla": "vanilla.yaml", "fqss": "fqss.yaml"}
LABELS = {"float": "Float", "float_more": "Float +", "vanilla": "Vanilla QAT 8-bit", "fqss": "FQSS 8-bit"}
GOALS = {"HTDemucs": -0.08, "ConvTasNet": -0.06}          # the paper's FQSS - float
PAPER = {"HTDemucs": (7.51, 6.83, 7.43), "ConvTasNet": (5.88, 5.65, 5.82)}
SOURCES = ("drums", "bass", "other", "vocals")


def load_recipe(recipe: str):
    path = REPO / "recipes" / "MUSDB18" / recipe / "train.py"
    if not path.is_file():
        raise SystemExit(f"--teacher {recipe}=...: no recipe {repo_path(path)}")
    spec = importlib.util.spec_from_file_location(f"music_recipe_{recipe}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_track_source(results: dict) -> list[float]:
    """The test's per-track median SDR of every source, in (track, source) order."""
    return [row[f"{source}_sdr_median"] for row in results["tracks"] for source in SOURCES]


def compare(recipe: str, teacher: Path, musdb: Path, out: Path, epochs: int) -> dict:
    """Train the three runs of one recipe from ``teacher`` and score the four models."""
    from fqss_plugin.demo import paired_delta
    from fqss_plugin.demucs.recipe import load_conf, test

    module = load_recipe(recipe)
    conf_dir = Path(module.__file__).parent / "conf"
    common = [f"dset.musdb={musdb}", f"dset.metadata={out / 'metadata'}", "test.shifts=0", f"optim.epochs={epochs}"]
    started = time.time()
    scores = {}
    qat_lr = load_conf([str(conf_dir / "fqss.yaml")]).optim.lr
    for run, conf_name in RUNS.items():
        extra = [f"optim.lr={qat_lr}"] if run == "float_more" else []
        module.main([str(conf_dir / conf_name), f"exp_dir={out / run}", f"pretrained={teacher}", *common, *extra])
        scores[run] = json.loads((out / run / "test_results.json").read_text())
    conf = load_conf([str(conf_dir / "float.yaml"), *common])
    scores["float"] = test(module.MODEL.load(teacher).eval(), conf)
    values = {run: per_track_source(result) for run, result in scores.items()}
    delta = {run: paired_delta(values[run], values["float"]) for run in ("float_more", "vanilla", "fqss")}
    gap = paired_delta(values["fqss"], values["vanilla"])
    return {"recipe": recipe, "teacher": repo_path(teacher), "qat_epochs": epochs, "test_tracks": len(scores["float"]["tracks"]),
            "sdr_median": {run: result["sdr_median"] for run, result in scores.items()},
            "nsdr": {run: result["nsdr"] for run, result in scores.items()},
            "delta_vs_float": {run: {"mean": m, "ci95": h} for run, (m, h) in delta.items()},
            "fqss_minus_vanilla": {"mean": gap[0], "ci95": gap[1]}, "per_track_source": values,
            "wall_time_s": time.time() - started, "command": command_line()}


def format_table(results: list[dict]) -> str:
    lines = ["| Model | QAT epochs | Float | Float + | Vanilla QAT 8-bit | FQSS 8-bit | vanilla - float | FQSS - float "
             "| FQSS - vanilla | paper (float / vanilla / FQSS) |", "|---|" + "---|" * 9]
    for r in results:
        sdr, d, g = r["sdr_median"], r["delta_vs_float"], r["fqss_minus_vanilla"]
        lines.append(f"| {r['recipe']} | {r['qat_epochs']} | {sdr['float']:.2f} | {sdr['float_more']:.2f} | {sdr['vanilla']:.2f} | "
                     f"{sdr['fqss']:.2f} | {d['vanilla']['mean']:+.3f} ± {d['vanilla']['ci95']:.3f} | "
                     f"**{d['fqss']['mean']:+.3f} ± {d['fqss']['ci95']:.3f}** | "
                     f"**{g['mean']:+.3f} ± {g['ci95']:.3f}** | {' / '.join(map(str, PAPER[r['recipe']]))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", action="append", required=True, metavar="RECIPE=PACKAGE",
                        help="float package per recipe of recipes/MUSDB18 (repeatable)")
    parser.add_argument("--musdb", type=Path, default=REPO / "data" / "musdb18hq")
    parser.add_argument("--out", type=Path, default=REPO / "exp" / "music_table")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each of Float +, vanilla and FQSS")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    teachers = []
    for text in args.teacher:
        recipe, _, path = text.partition("=")
        if not recipe or not Path(path).is_file():
            parser.error(f"--teacher {text!r}: expected RECIPE=PACKAGE with an existing package file")
        teachers.append((recipe, Path(path).resolve()))
    table = args.out / "music_table.json"
    rows = {r["recipe"]: r for r in (json.loads(table.read_text()) if table.is_file() else [])}
    for recipe, teacher in teachers:
        rows[recipe] = compare(recipe, teacher, args.musdb.resolve(), (args.out / recipe).resolve(), args.epochs)
    results = list(rows.values())
    args.out.mkdir(parents=True, exist_ok=True)
    table.write_text(json.dumps(results, indent=1))
    verdicts = []
    for r in results:
        fqss, gap, goal = r["delta_vs_float"]["fqss"], r["fqss_minus_vanilla"], GOALS[r["recipe"]]
        verdicts.append(f"* {r['recipe']} (teacher `{r['teacher']}`): FQSS - float = {fqss['mean']:+.3f} dB (goal >= "
                        f"{goal:+.2f}: {'met' if fqss['mean'] >= goal else 'NOT met'}); FQSS better than vanilla (paired "
                        f"95% CI of FQSS - vanilla above 0): {'yes' if gap['mean'] - gap['ci95'] > 0 else 'no'}; "
                        f"{r['qat_epochs']} epochs per run ({r['wall_time_s'] / 60:.0f} min); made by "
                        f"`{r.get('command', '(not recorded)')}`.")
    body = (f"Latest command: `{command_line()}`\n\nCPU: {describe_cpu()}\n\nmuseval SDR (dB; BSSEval v4, median over 1 s "
            f"frames, then over tracks, mean over the four sources) on the toy MUSDB18-HQ test split "
            f"({results[0]['test_tracks']} synthesized songs: not MUSDB18-HQ numbers). Deltas are paired per track "
            "and source (the track's median), ± the half-width of the 95% confidence interval.\n\n"
            + format_table(results) + "\n\n" + "\n".join(verdicts))
    publish("Paper table (toy MUSDB18-HQ)", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
