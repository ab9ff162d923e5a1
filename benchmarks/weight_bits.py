"""Weights below 8 bits: FQSS QAT of the embedded ConvTasNet with 7, 6, 5 and 4-bit weight codes, and their int8 files.

For each ``--bits`` value: a ``--qat-steps`` FQSS QAT from the shipped teacher with ``QuantConfig(weight_bits=b)``
(``benchmarks/int8_runtime.py``'s ``cached_qat``, the recipe's loss settings; 8-bit activations everywhere),
its SI-SDRi on the embedded test set paired against the float teacher (95 % CI), and the ONNX file ``to_onnx``
writes for it: codes of ``b`` bits stored in int8 (so the file is as large as the 7-bit one; packing 4-bit
codes is not done), its onnxruntime SI-SDRi and the largest weight code in it.

``--mixed BITS`` adds a mixed-precision row: :func:`fqss_plugin.quant.mixed_precision.allocate_weight_bits` picks
8, 6 or 4 bits per layer of the 8-bit QAT model to an average of ``BITS`` (scored on ``--allocate-mixtures``
mixtures of the dev split, never the test split), and the same QAT then trains the teacher under that map; the row
is paired against the 8-bit one. ``--keep-8bit encoder decoder`` adds a row at the narrowest ``--bits`` with the
named layers kept at 8 bits (the filterbanks: 1.3 % of the weights), as low-bit models usually keep their
first and last layers. Writes its section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.int8_runtime import (cached_qat, dataset, load_teacher, recipe_loss_settings,  # noqa: E402
                                     si_sdr_improvements)
from benchmarks.report import command_line, publish  # noqa: E402
from fqss_plugin.demo import paired_delta  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 7, 6, 5, 4])
    parser.add_argument("--qat-steps", type=int, default=150)
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "exp" / "weight_bits")
    parser.add_argument("--mixed", type=float, default=None, metavar="BITS",
                        help="also a mixed-precision model at this average weight width (needs 8 in --bits)")
    parser.add_argument("--allocate-mixtures", type=int, default=20, help="dev mixtures scoring the allocation")
    parser.add_argument("--keep-8bit", nargs="+", default=[], metavar="LAYER",
                        help="also the narrowest width with these layers (names as in named_modules) at 8 bits")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.mixed is not None and 8 not in args.bits:
        parser.error("--mixed allocates bits on the 8-bit model: add 8 to --bits")
    import onnxruntime as ort
    from fqss_plugin.export import to_onnx
    from fqss_plugin.export.runtime import session_options

    torch.set_num_threads(1)
    teacher, source = load_teacher(None)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    test_set = dataset("test", None)
    with torch.no_grad():
        float_scores = si_sdr_improvements(lambda x: teacher(x).numpy(), test_set)
    rows = ["| weight bits | QAT (s) | torch fake-quant SI-SDRi | vs float (paired, 95% CI) | int8 file | onnxruntime SI-SDRi | "
            "largest weight code |", "|---|---|---|---|---|---|---|"]
    runs = [(str(bits), f"w{bits}", {"weight_bits": bits}) for bits in args.bits]
    if args.keep_8bit:
        narrowest = min(args.bits)
        runs.append((f"{narrowest}, {' and '.join(args.keep_8bit)} at 8", f"w{narrowest}_keep_{'_'.join(args.keep_8bit)}",
                     {"weight_bits": narrowest, "layer_weight_bits": {name: 8 for name in args.keep_8bit}}))
    if args.mixed is not None:
        runs.append((f"mixed, average {args.mixed:g}", f"mixed{args.mixed:g}", None))
    all_scores, int4_lines = {}, []
    for label, stem, overrides in runs:
        if overrides is None:                      # the mixed row: bits allocated on the 8-bit QAT model
            bit_map, report = mixed_bits(work / "w8.pth", teacher, args.mixed, args.allocate_mixtures)
            overrides = {"weight_bits": 8, "layer_weight_bits": bit_map}
            label = f"mixed 8/6/4, average {report['average_bits']:.2f}"
        model, meta = cached_qat(teacher, source, recipe_loss_settings(), args.qat_steps, args.calib_steps, work,
                                 args.retrain, stem=stem, **overrides)
        if overrides.get("layer_weight_bits"):
            label += f" (average {average_bits(model):.2f})" if "average" not in label else ""
        with torch.no_grad():
            scores = all_scores[stem] = si_sdr_improvements(lambda x: model(x).numpy(), test_set)
        path = work / f"{stem}.onnx"
        widths = [overrides["weight_bits"], *overrides.get("layer_weight_bits", {}).values()]
        widest = max(widths)
        result = to_onnx(model, path, target="vnni" if widest == 8 else "portable")
        session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        ort_scores = si_sdr_improvements(lambda x: session.run(None, {"mixture": x.numpy()})[0], test_set)
        codes = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
        largest = max(int(np.abs(c.astype(np.int32)).max()) for c in codes if c.dtype == np.int8 and c.size > 1)
        delta, ci = paired_delta(scores, float_scores)
        rows.append(f"| {label} | {meta.get('qat_seconds', '-')} | {np.mean(scores):.3f} | {delta:+.3f} ± {ci:.3f} | "
                    f"{result.bytes:,} B | {np.mean(ort_scores):.3f} | {largest} |")
        print(rows[-1], flush=True)
        if min(widths) <= 4:
            int4_lines.append(int4_row(label, path, session, test_set))
    body = f"""Command: `{command_line()}`

The embedded ConvTasNet: the shipped float teacher ({source}, SI-SDRi {np.mean(float_scores):.3f} dB over the
{len(test_set)} test mixtures), then a {args.qat_steps}-step FQSS QAT ({args.calib_steps} calibrating, the recipe's
loss settings, batch 4 x 1 s, same seed) per weight width; activations stay 8-bit. The 8-bit row is exported with
`target="vnni"` (int8 codes up to 127), as is a mixed model with 8-bit layers; the others are portable. Files store every width in int8.

{chr(10).join(rows)}
{mixed_note(all_scores, args)}{int4_note(int4_lines)}"""
    publish("Weights below 8 bits (embedded ConvTasNet)", body, not args.no_write)
    return 0


def int4_row(label: str, path: Path, session, test_set) -> str:
    """The int8 file of ``path`` against its INT4 version (``fqss export --int4-weights``): size, onnxruntime
    SI-SDRi and time per second of audio, one thread, both sessions on the same mixtures."""
    import onnxruntime as ort
    from fqss_plugin.export.int4 import write_int4_file
    from fqss_plugin.export.runtime import session_options
    int4_path = path.with_name(path.stem + "_int4.onnx")
    write_int4_file(path, int4_path)
    int4 = ort.InferenceSession(str(int4_path), session_options(1), providers=["CPUExecutionProvider"])
    timing = {}
    for name, sess in (("int8", session), ("int4", int4)):
        start = time.perf_counter()
        scores = si_sdr_improvements(lambda x: sess.run(None, {"mixture": x.numpy()})[0], test_set)
        timing[name] = (time.perf_counter() - start, float(np.mean(scores)))
    seconds = sum(mix.shape[-1] for mix, _ in test_set) / 8000
    return (f"| {label} | {path.stat().st_size:,} B | {int4_path.stat().st_size:,} B | {timing['int8'][1]:.3f} | "
            f"{timing['int4'][1]:.3f} | {1000 * timing['int8'][0] / seconds:.2f} | "
            f"{1000 * timing['int4'][0] / seconds:.2f} |")


def int4_note(lines: list[str]) -> str:
    if not lines:
        return ""
    return ("\nINT4 files (`fqss export --int4-weights`: the 4-bit codes two per byte, opset 21). onnxruntime "
            "dequantizes INT4 weights and runs those layers in float (its CPU integer kernels take 8-bit weights); "
            "SI-SDRi over the test set, time per second of audio including the scoring, one thread:\n\n"
            "| weight bits | int8 file | INT4 file | int8 SI-SDRi | INT4 SI-SDRi | int8 ms/s | INT4 ms/s |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def average_bits(model) -> float:
    """The weight bits of ``model``'s quantized layers, averaged over their parameters."""
    from fqss_plugin.quant.mixed_precision import weighted_layers
    layers = weighted_layers(model).values()
    return sum(layer.weight_quantizer.bits * layer.weight.numel() for layer in layers) / \
        sum(layer.weight.numel() for layer in layers)


def mixed_bits(w8_package: Path, teacher, budget: float, mixtures: int) -> tuple[dict[str, int], dict]:
    """Per-layer weight bits (8, 6, 4) at an average of ``budget``, allocated on the 8-bit QAT model by the
    SI-SDRi of ``mixtures`` dev mixtures (``allocate_weight_bits``: one layer narrowed at a time, greedy)."""
    from fqss_plugin.asteroid import load_quantized_model
    from fqss_plugin.quant.mixed_precision import allocate_weight_bits
    model = load_quantized_model(w8_package).eval()
    dev = [dataset("dev", None)[i] for i in range(mixtures)]
    with torch.no_grad():
        return allocate_weight_bits(model, lambda net: float(np.mean(si_sdr_improvements(
            lambda x: net(x).numpy(), dev))), budget)


def mixed_note(scores: dict[str, list[float]], args) -> str:
    """The mixed row against the 8-bit row (paired over the test mixtures), or nothing without ``--mixed``."""
    if args.mixed is None:
        return ""
    stem = f"mixed{args.mixed:g}"
    delta, ci = paired_delta(scores[stem], scores["w8"])
    return (f"\nMixed precision (`--mixed {args.mixed:g}`: bits allocated on the 8-bit QAT model by "
            f"{args.allocate_mixtures} dev mixtures, then the same QAT under that map) vs the 8-bit weights: "
            f"{delta:+.3f} ± {ci:.3f} dB SI-SDRi (paired, 95% CI).\n")


if __name__ == "__main__":
    sys.exit(main())
