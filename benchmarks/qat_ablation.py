"""What each QAT setting is worth: short vanilla / FQSS runs of the ConvTasNet recipe, one change at a time.

Every variant fine-tunes the same float teacher with ``recipes/LibriMix/ConvTasNet`` for the same
number of epochs (same seed, same batches), then all are scored on the same embedded test mixtures;
deltas are paired per mixture against the float teacher (± the 95 % CI half-width). "Float +" is
the teacher fine-tuned in float as long, at the QAT learning rate: what the extra steps alone give.
Writes its section of BENCHMARKS.md.

    python benchmarks/qat_ablation.py --epochs 1
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import command_line, write_section  # noqa: E402
from fqss_plugin.demo import TEACHER, discard_runs_of_another_teacher, fine_tune, paired_delta, score  # noqa: E402

WEIGHT_LR = "0.0001"
SPREAD_NOTE = ("Single seed: the training crops come from Python's `random`, so two invocations that differ in "
               "anything consuming it (an earlier one validated on random crops) train on other crops; across such "
               "invocations these deltas moved by up to 0.05 dB, so read differences below that as noise.")
DB, LINEAR = ("--loss_average", "db"), ("--loss_average", "linear")
# on 2 x 8-bit tensors: the mask product (the decoder's input) and its operand the encoder's output (SPLIT, the
# recipe's), the product only (MASK_SPLIT), neither (PAPER_SPLIT: the paper, every activation on one 8-bit tensor)
SPLIT = ("--decoder_in_splits", "2", "--encoder_out_splits", "2")
MASK_SPLIT = ("--decoder_in_splits", "2", "--encoder_out_splits", "1")
PAPER_SPLIT = ("--decoder_in_splits", "1", "--encoder_out_splits", "1")
VARIANTS = {   # name: (conf, flags, what it shows); the loss flags are spelled out, whatever the recipe's defaults
    "float +": ("float", ("--lr", WEIGHT_LR), "no quantization: the gain of the extra float steps alone"),
    "vanilla, ranges at the weights' lr": ("vanilla", ("--quantizer_lr", WEIGHT_LR, *DB), "before quantizer_lr"),
    "vanilla": ("vanilla", DB, "recipe default: quantizer_lr 1e-2, loss averaged in dB"),
    "vanilla, linear average": ("vanilla", LINEAR, "the paper's average of the loss"),
    "FQSS as published": ("fqss", ("--lambda_kd", "0.1", *LINEAR, *PAPER_SPLIT),
                          "lambda_kd 0.1, linear average, 8-bit mask product"),
    "FQSS, the paper's loss": ("fqss", ("--lambda_kd", "0.1", *LINEAR, *MASK_SPLIT),
                               "lambda_kd 0.1, linear average, 2 x 8-bit mask product"),
    "FQSS, lambda_kd 0.1": ("fqss", ("--lambda_kd", "0.1", *DB, *MASK_SPLIT),
                            "the paper's distillation weight, dB average, 2 x 8-bit mask product"),
    "FQSS": ("fqss", ("--lambda_kd", "0.01", *DB, *SPLIT),
             "recipe default: splitter + combiner + 2 x 8-bit encoder output and mask product, lambda_kd 0.01, dB average"),
    "FQSS, 8-bit encoder output": ("fqss", ("--lambda_kd", "0.01", *DB, *MASK_SPLIT),
                                   "the encoder's output (the masker's input, the mask's operand) on one 8-bit tensor"),
    "FQSS, 8-bit mask product": ("fqss", ("--lambda_kd", "0.01", *DB, *PAPER_SPLIT),
                                 "encoder output and decoder input on one 8-bit tensor each, as in the paper"),
    "FQSS, weights at 3e-5": ("fqss", ("--lr", "3e-5", "--lambda_kd", "0.01", *DB, *MASK_SPLIT),
                              "8-bit encoder output; the weights' Adam lr lowered from 1e-4"),
    "FQSS, weights at 1e-5": ("fqss", ("--lr", "1e-5", "--lambda_kd", "0.01", *DB, *MASK_SPLIT), "likewise"),
    "FQSS, weights frozen": ("fqss", ("--lr", "0", "--lambda_kd", "0.01", *DB, *MASK_SPLIT),
                             "likewise; only the quantizers' ranges learned: the teacher's weights, fake-quantized"),
    "FQSS, no distillation": ("fqss", ("--lambda_kd", "0.0", *DB, *MASK_SPLIT), "8-bit encoder output, task loss only"),
    "FQSS, no distillation, linear average": ("fqss", ("--lambda_kd", "0.0", *LINEAR, *MASK_SPLIT), ""),
}


def run_dir_name(variant: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", variant.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(TEACHER))
    parser.add_argument("--data", type=Path, default=REPO / "data" / "librimix")
    parser.add_argument("--out", type=Path, default=REPO / "exp" / "qat_ablation")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                        help=f"run these variants only (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    parser.add_argument("--section", default="QAT ablation (embedded ConvTasNet)",
                        help="the BENCHMARKS.md section to write (e.g. its own one for an --only subset)")
    args = parser.parse_args(argv)
    variants = {name: VARIANTS[name] for name in VARIANTS if not args.only or name in args.only}
    conf, sources, minutes = None, {"float": args.teacher}, {}
    discard_runs_of_another_teacher(args.teacher, args.out, tuple(map(run_dir_name, VARIANTS)))
    for name, (conf_name, flags, _) in variants.items():
        start = time.time()
        exp_dir = args.out / run_dir_name(name)
        reused = (exp_dir / "best_model.pth").is_file()   # an earlier invocation finished it: the recipe resumes
        print(f"-- {name}: {conf_name}.yml {' '.join(flags)}{' (reused)' if reused else ''}")
        conf = fine_tune("ConvTasNet", conf_name, args.teacher, args.data, exp_dir, args.epochs,
                         flags=(*flags, "--progress_bar", "false"))
        sources[name] = exp_dir / "best_model.pth"
        minutes[name] = "reused" if reused else f"{(time.time() - start) / 60:.1f}"
    per_mixture, _ = score(sources, conf)
    rows = ["| variant | conf and flags | SI-SDRi (dB) | - float (95% CI) | - float + (95% CI) | train min | note |",
            "|---|---|---|---|---|---|---|"]
    summary = {}
    for name, (conf_name, flags, note) in variants.items():
        vs_float = paired_delta(per_mixture[name], per_mixture["float"])
        vs_more = paired_delta(per_mixture[name], per_mixture["float +"]) if "float +" in per_mixture else None
        mean = sum(per_mixture[name]) / len(per_mixture[name])
        summary[name] = {"si_sdri": mean, "vs_float": vs_float, "vs_float_more": vs_more}
        more = "-" if name == "float +" or vs_more is None else f"{vs_more[0]:+.3f} ± {vs_more[1]:.3f}"
        rows.append(f"| {name} | `{conf_name}.yml {' '.join(flags)}` | {mean:.3f} | {vs_float[0]:+.3f} ± "
                    f"{vs_float[1]:.3f} | {more} | {minutes[name]} | {note} |")
    pairs = [("FQSS", "vanilla"), ("FQSS", "FQSS, 8-bit encoder output"),
             ("FQSS, 8-bit encoder output", "FQSS, 8-bit mask product"), ("FQSS", "FQSS, 8-bit mask product"), ("FQSS", "FQSS as published"),
             ("FQSS, the paper's loss", "FQSS as published"), ("FQSS, 8-bit encoder output", "FQSS, no distillation"),
             ("FQSS, lambda_kd 0.1", "FQSS, 8-bit encoder output"), ("FQSS, weights frozen", "FQSS, 8-bit encoder output"),
             ("FQSS, no distillation", "vanilla"), ("FQSS, the paper's loss", "vanilla, linear average"),
             ("vanilla", "vanilla, linear average"), ("FQSS, no distillation", "FQSS, no distillation, linear average"),
             ("FQSS, lambda_kd 0.1", "FQSS, the paper's loss"), ("vanilla", "vanilla, ranges at the weights' lr")]
    comparisons = []
    for a, b in (pair for pair in pairs if set(pair) <= set(variants)):
        mean, half = paired_delta(per_mixture[a], per_mixture[b])
        comparisons.append(f"* {a} - {b}: {mean:+.3f} ± {half:.3f} dB")
        summary[f"{a} - {b}"] = (mean, half)
    float_mean = sum(per_mixture["float"]) / len(per_mixture["float"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qat_ablation.json").write_text(json.dumps({"summary": summary, "per_mixture": per_mixture}, indent=2))
    teacher = Path(args.teacher).resolve()
    teacher = teacher.relative_to(REPO) if teacher.is_relative_to(REPO) else args.teacher
    body = (f"Command: `{command_line()}`\n\nTeacher: `{teacher}` "
            f"(float SI-SDRi {float_mean:.3f} dB). Each variant: {args.epochs} epoch(s) of the ConvTasNet recipe "
            f"(272 steps per epoch, batch 4 x 1 s, weights at Adam {WEIGHT_LR}, 100 calibration steps, seed 0), "
            f"1 CPU thread; SI-SDRi on the {len(per_mixture['float'])} embedded test mixtures (synthetic voices: not "
            "LibriMix numbers), deltas paired per mixture.\n\n" + "\n".join(rows)
            + "\n\nPaired differences between variants (same mixtures, 95% CI):\n\n" + "\n".join(comparisons)
            + "\n\n" + SPREAD_NOTE)
    print(body)
    if not args.no_write:
        write_section(args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
