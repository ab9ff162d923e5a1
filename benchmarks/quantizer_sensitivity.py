"""Where a quantized ConvTasNet's remaining loss comes from: each group of quantizers left out in turn.

The trained quantized model (default: the demo's FQSS model) is scored on the embedded test
mixtures with all its quantizers, with none (its weights in float: what its training alone gives),
and with one group at a time run as identities (:func:`fqss_plugin.quant.sensitivity.bypassed`).
"Recovered" is the paired SI-SDRi gain of leaving that group in float, i.e. the cost of its 8-bit
rounding; groups interact, so the costs need not add up. Writes its section of BENCHMARKS.md.

    python benchmarks/quantizer_sensitivity.py                      # after `make demo`
    python benchmarks/quantizer_sensitivity.py --model exp/qat_ablation/fqss_8_bit_mask_product/best_model.pth \
        --section "Quantizer sensitivity, 8-bit mask product (embedded ConvTasNet)"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import command_line, repo_path, write_section  # noqa: E402
from fqss_plugin.asteroid.recipe import load_model, parse_conf, score_test_set  # noqa: E402
from fqss_plugin.demo import TEACHER, paired_delta, si_sdri  # noqa: E402
from fqss_plugin.quant.sensitivity import bypassed, modules_named, quantizer_groups  # noqa: E402

CONF = REPO / "recipes" / "LibriMix" / "ConvTasNet" / "conf" / "fqss.yml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "demo_results" / "fqss" / "best_model.pth",
                        help="a quantized best_model.pth written by the recipe")
    parser.add_argument("--teacher", default=str(TEACHER), help="the float model it was trained from")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "librimix", help="embedded data directory")
    parser.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    parser.add_argument("--section", default="Quantizer sensitivity (embedded ConvTasNet)",
                        help="the BENCHMARKS.md section to write")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file (run `make demo` first, or pass a recipe's best_model.pth)")
    start = time.time()
    conf = parse_conf(CONF, ["--data_dir", str(args.data / "data")])
    model = load_model(args.model)
    groups = quantizer_groups(model)
    everything = [name for names in groups.values() for name in names]

    def score(label: str, bypass: list[str]) -> list[float]:
        with bypassed(modules_named(model, bypass)):
            return si_sdri(score_test_set(model, conf, metrics=["si_sdr"], desc=label))

    teacher = si_sdri(score_test_set(load_model(args.teacher), conf, metrics=["si_sdr"], desc="float teacher"))
    quantized = score("all quantized", [])
    rows = [("none (all in float)", len(everything), score("none quantized", everything))]
    rows += [(group, len(names), score(group, names)) for group, names in groups.items()]

    def delta(values: list[float], reference: list[float]) -> str:
        mean, half = paired_delta(values, reference)
        return f"{mean:+.3f} ± {half:.3f}"

    mean = sum(quantized) / len(quantized)
    lines = ["| quantizers left in float | count | SI-SDRi (dB) | recovered (vs all quantized) | vs float teacher |",
             "|---|---|---|---|---|",
             f"| (all quantized) | 0 | {mean:.3f} | - | {delta(quantized, teacher)} |"]
    for label, count, values in sorted(rows, key=lambda row: -sum(row[2])):
        lines.append(f"| {label} | {count} | {sum(values) / len(values):.3f} | {delta(values, quantized)} | "
                     f"{delta(values, teacher)} |")
    body = f"""Command: `{command_line()}`

Model: `{repo_path(args.model)}` (scored with
its quantizers as trained), float teacher `{Path(args.teacher).name}`; {len(quantized)} embedded test mixtures,
paired deltas per mixture ± 95 % CI half-width. A row runs the named quantizers as identities (the
8-bit input split and 2 x 8-bit output recombination stay in place, except their quantizers in the row
that names them); its "recovered" column is what that group's 8-bit rounding costs. "None" keeps the
QAT-trained weights in float: the gap to the teacher that training, not rounding, leaves.

{chr(10).join(lines)}

Wall time {(time.time() - start) / 60:.1f} min (1 thread)."""
    print("\n" + body)
    if not args.no_write:
        write_section(args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
