"""Where the SDR of a quantized separator goes: the bound b-bit signals put on it, and what each part costs.

``fqss analyze --checkpoint PACKAGE --mixtures mixture_test_mix_clean.csv --out DIR`` writes
``analysis.json`` and three plots:

* ``sdr_vs_bits.png`` -- the SDR bound of a b-bit signal and the measured SI-SDR, against b. A signal
  of peak ``p`` and power ``P`` quantized on ``2^b`` uniform levels over ``[-p, p]`` (step ``Δ = 2p/2^b``,
  noise power ``Δ²/12``) has the SNR

      SNR_b = 10 log10(P / (Δ²/12)) = 6.02 b + 4.77 - C,      C = 20 log10(p / sqrt(P)), the crest factor

  (``6.02 b + 1.76`` for a full-scale sine, ``C = 3.01`` dB). Taken per mixture (the input, normalised
  to its own peak) and per source (each output, at its own peak: the best a b-bit output can do), its
  median over the test mixtures bounds the SDR of a model whose input or output is one b-bit signal.
  The measured curve runs the model with its input and output passed through such b-bit quantizers
  (per-example peak): where it meets the bound, the signal path, not the network, limits the SDR;
  ``k`` split 8-bit signals (the FQSS input splitter and output combiner) are worth about ``8k`` bits.
* ``float_vs_quantized.png`` -- per-mixture SI-SDRi of the quantized model against the float one
  (with ``--float``): which mixtures lose, and how much.
* ``sensitivity.png`` -- the SI-SDR gained when one group of quantizers is bypassed
  (:mod:`fqss_plugin.quant.sensitivity`): where in the network the 8-bit rounding costs.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

BITS = tuple(range(4, 17))


def signal_bound_db(signal: np.ndarray, bits: int) -> float:
    """``10 log10(P / (Δ²/12))`` with ``Δ = 2 peak / 2^bits``: the SNR of ``signal`` on ``bits`` uniform levels."""
    power = float(np.mean(np.square(signal)))
    step = 2 * float(np.max(np.abs(signal))) / 2 ** bits
    return 10 * np.log10(power / (step ** 2 / 12)) if power > 0 and step > 0 else float("nan")


def crest_factor_db(signal: np.ndarray) -> float:
    return float(20 * np.log10(np.max(np.abs(signal)) / np.sqrt(np.mean(np.square(signal)))))


def quantize_signal(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` on ``2^bits`` uniform levels over its own peak range (per example, last axis)."""
    peak = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
    step = 2 * peak / 2 ** bits
    return torch.clamp(torch.round(x / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step


def bounds(inputs: list[np.ndarray], outputs: list[np.ndarray], bits: tuple[int, ...]) -> dict:
    """``{"crest_factor_db", "bound_db"}``: the median crest factor and b-bit bound of the input and of the output
    signals (each a 1-D signal: a mixture, a source, one channel of either)."""
    return {"crest_factor_db": {"input_median": float(np.median([crest_factor_db(x) for x in inputs])),
                                "sources_median": float(np.median([crest_factor_db(y) for y in outputs]))},
            "bound_db": {"input": {b: float(np.median([signal_bound_db(x, b) for x in inputs])) for b in bits},
                         "output": {b: float(np.median([signal_bound_db(y, b) for y in outputs])) for b in bits}}}


@contextmanager
def signal_io_on_bits(model: torch.nn.Module, bits: int) -> Iterator[None]:
    """Inside the block, ``model``'s input and output pass through :func:`quantize_signal` on ``bits`` bits
    (forward hooks, so any caller -- a chunked ``apply_model`` included -- sees a b-bit signal path)."""
    hooks = [model.register_forward_pre_hook(lambda _, inputs: (quantize_signal(inputs[0], bits), *inputs[1:])),
             model.register_forward_hook(lambda _, inputs, output: quantize_signal(output, bits))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def read_mixtures(csv_path: Path, limit: int | None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(id, mixture [T], sources [n_src, T])`` from a LibriMix metadata CSV (Asteroid's local metadata)."""
    import soundfile as sf
    if not csv_path.is_file():
        raise FileNotFoundError(f"--mixtures {csv_path}: no such file (a LibriMix metadata CSV, e.g. "
                                "data/wav8k/min/test/mixture_test_mix_clean.csv)")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "mixture_path" not in rows[0]:
        raise ValueError(f"--mixtures {csv_path}: not a LibriMix metadata CSV (no mixture_path column)")
    out = []
    for row in rows[:limit]:
        mixture = sf.read(row["mixture_path"], dtype="float32")[0]
        sources = [sf.read(row[key], dtype="float32")[0] for key in sorted(row) if key.startswith("source_")]
        out.append((row.get("mixture_ID", row["mixture_path"]), torch.from_numpy(mixture),
                    torch.from_numpy(np.stack(sources))))
    return out


@torch.no_grad()
def separate(model: torch.nn.Module, mixture: torch.Tensor) -> torch.Tensor:
    out = model(mixture[None])
    return out if out.dim() == 3 else out.unsqueeze(1)


def si_sdri_scores(model: torch.nn.Module, mixtures: list) -> list[float]:
    """SI-SDR improvement (dB, permutation-invariant) of ``model`` on each mixture."""
    from .loss import pit_sisdr_db as si_sdr_db
    return [float(si_sdr_db(separate(model, m), s[None]) - si_sdr_db(m.expand_as(s)[None], s[None]))
            for _, m, s in mixtures]


@torch.no_grad()
def analyze(model: torch.nn.Module, mixtures: list, float_model: torch.nn.Module | None = None,
            bits: tuple[int, ...] = BITS, sensitivity: bool = True) -> dict:
    """The figures of the module docstring, as a JSON-ready dict."""
    from .loss import pit_sisdr_db as si_sdr_db
    from .quant.sensitivity import bypassed, modules_named, quantizer_groups

    model.eval()
    reference_model = (float_model or model).eval()
    inputs = [m.numpy() for _, m, _ in mixtures]
    result = {"mixtures": len(mixtures),
              **bounds(inputs, [s.numpy() for _, _, ss in mixtures for s in ss], bits),
              "input_snr_8bit_db": float(np.median([signal_bound_db(m, 8) for m in inputs]))}
    measured = {}
    for b in bits:
        with signal_io_on_bits(reference_model, b):
            measured[b] = float(np.median([float(si_sdr_db(separate(reference_model, m), s[None]))
                                           for _, m, s in mixtures]))
    result["metric"], result["measured_db"] = "SI-SDR", measured

    def scores_of(net) -> list[float]:
        return si_sdri_scores(net, mixtures)
    result["si_sdri"] = {"quantized": scores_of(model)}
    if float_model is not None:
        result["si_sdri"]["float"] = scores_of(float_model)
    if sensitivity:
        base = float(np.mean(result["si_sdri"]["quantized"]))
        gains = {}
        for group, names in quantizer_groups(model).items():
            with bypassed(modules_named(model, names)):
                gains[group] = float(np.mean(scores_of(model))) - base
        result["sensitivity_db"] = dict(sorted(gains.items(), key=lambda item: -item[1]))
    return result


def plot(result: dict, out: Path) -> list[Path]:
    """The PNG files of the module docstring; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    bits = sorted(int(b) for b in result["bound_db"]["input"])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(bits, [result["bound_db"]["input"][b] for b in bits], "b--", label="bound: b-bit input (median)")
    ax.plot(bits, [result["bound_db"]["output"][b] for b in bits], "g--", label="bound: b-bit output (median)")
    metric = result.get("metric", "SI-SDR")
    ax.plot(bits, [result["measured_db"][b] for b in bits], "ko-", ms=4,
            label=f"measured {metric}: model, b-bit input and output")
    ax.axvline(8, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("bits of the input / output signal")
    ax.set_ylabel("SDR (dB)")
    ax.set_title(result.get("title", f"SDR bound of b-bit signals vs measured {metric}"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    paths.append(out / "sdr_vs_bits.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if "float" in result.get("si_sdri", {}):
        reference, quantized = result["si_sdri"]["float"], result["si_sdri"]["quantized"]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(reference, quantized, s=14, alpha=0.7,
                   label=f"quantized - float: {np.mean(quantized) - np.mean(reference):+.3f} dB (mean)")
        low, high = min(reference + quantized), max(reference + quantized)
        ax.plot([low, high], [low, high], "k--", lw=1, label="= float")
        ax.set_xlabel("float SI-SDRi per mixture (dB)")
        ax.set_ylabel("quantized SI-SDRi (dB)")
        ax.set_title("Quantized vs float, per test mixture")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        paths.append(out / "float_vs_quantized.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if result.get("sensitivity_db"):
        groups = list(result["sensitivity_db"])
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(groups) + 1.5))
        ax.barh(range(len(groups)), [result["sensitivity_db"][g] for g in groups], color="tab:orange")
        ax.set_yticks(range(len(groups)), groups, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("SI-SDRi gained when the group is bypassed (dB)")
        ax.set_title("Where the 8-bit rounding costs")
        fig.tight_layout()
        paths.append(out / "sensitivity.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def reading(result: dict) -> str:
    """What the SDR-vs-bits curves say, in one paragraph: the 8-bit bounds, the model's plateau (16-bit signals),
    what one 8-bit input and output cost it, and from how many bits the signal path stops limiting it."""
    measured = {int(b): v for b, v in result["measured_db"].items()}
    bound = {side: {int(b): v for b, v in result["bound_db"][side].items()} for side in ("input", "output")}
    widest = max(measured)
    plateau, at8 = measured[widest], measured.get(8, float("nan"))
    enough = min((b for b in sorted(measured) if all(measured[c] >= plateau - 0.05 for c in measured if c >= b)),
                 default=widest)
    metric = result.get("metric", "SI-SDR")
    text = (f"One 8-bit input bounds the SDR at {bound['input'][8]:.1f} dB and one 8-bit output at "
            f"{bound['output'][8]:.1f} dB (median crest factors {result['crest_factor_db']['input_median']:.1f} and "
            f"{result['crest_factor_db']['sources_median']:.1f} dB). The model reaches {plateau:.2f} dB {metric} with "
            f"{widest}-bit signals and {at8:.2f} dB with one 8-bit input and output ({at8 - plateau:+.2f} dB); it is "
            f"within 0.05 dB of its {widest}-bit figure from {enough} bits on")
    if enough <= 8:
        return text + ": at 8 bits the network, not the signal path, limits it."
    return (text + f": at 8 bits the signal path limits it, and {enough} bits remove that limit "
            f"(the FQSS input and output, on 2 x 8-bit signals, carry about 16).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="quantized model package (as for `fqss export`)")
    parser.add_argument("--float", dest="float_model", default=None,
                        help="the float model (Asteroid package, directory or hub id) for the per-mixture comparison")
    parser.add_argument("--mixtures", required=True, type=Path, help="LibriMix metadata CSV of the test mixtures")
    parser.add_argument("--limit", type=int, default=None, help="at most this many mixtures")
    parser.add_argument("--out", required=True, type=Path, help="folder for analysis.json and the plots")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the per-group bypass runs")
    parser.add_argument("--weight-budget", type=float, default=None, metavar="BITS",
                        help="also allocate per-layer weight bits (8, 6, 4) to this average, guided by each layer's "
                             "measured SI-SDRi loss (quant.mixed_precision), and write weight_bits.json: the map a "
                             "recipe's quant.layer_weight_bits takes")
    parser.add_argument("--trust-package", action="store_true", help="as for `fqss export`")


def run(args: argparse.Namespace) -> int:
    from .export.registry import load_quantized_package, package_loader_for

    def fail(message: str) -> int:
        print(f"fqss analyze: error: {message}", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out} is a file")
    try:
        mixtures = read_mixtures(args.mixtures, args.limit)
        model = load_quantized_package(args.checkpoint, args.trust_package)
        float_model = None
        if args.float_model:
            float_loader = package_loader_for(args.float_model)
            if float_loader.load_float is None:
                return fail(f"--float {args.float_model}: the {float_loader.toolkit} adapter loads no float package")
            float_model = float_loader.load_float(args.float_model)
    except (ValueError, FileNotFoundError) as error:
        return fail(str(error))
    torch.set_num_threads(1)
    result = analyze(model, mixtures, float_model, sensitivity=not args.no_sensitivity)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.weight_budget is not None:
        from .quant.mixed_precision import allocate_weight_bits
        try:
            with torch.no_grad():
                bits, report = allocate_weight_bits(model, lambda net: float(np.mean(si_sdri_scores(net, mixtures))),
                                                    args.weight_budget)
        except ValueError as error:
            return fail(str(error))
        result["weight_bits"] = {"budget": args.weight_budget, "map": bits, **report}
        (args.out / "weight_bits.json").write_text(json.dumps(bits, indent=1))
        print(f"{args.out / 'weight_bits.json'}: average {report['average_bits']:.2f} weight bits")
    (args.out / "analysis.json").write_text(json.dumps(result, indent=1))
    for path in plot(result, args.out):
        print(path)
    print(reading(result))
    print(f"input SNR of one 8-bit signal (median): {result['input_snr_8bit_db']:.1f} dB; "
          f"quantized SI-SDRi {np.mean(result['si_sdri']['quantized']):.2f} dB")
    return 0
