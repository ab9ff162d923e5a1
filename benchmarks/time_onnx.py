"""Time ONNX files on this machine's CPU and check their outputs against references made on another one.

Needs only numpy, onnx and onnxruntime (no torch, no toolkit), so it runs on any machine the files are copied
to. ``--write-references`` (on a machine whose integer kernels are exact: VNNI or ARM) stores each file's
output for the folder's ``mixture.npy``; a later run elsewhere reports the output SNR against them, which
shows a CPU whose kernels saturate, and the latency (1 thread, median of ``--repeats`` interleaved runs)
against the folder's ``fp32.onnx``. The folders are the ones ``benchmarks/int8_portable.py`` leaves in
``exp/int8_portable/``. Prints a markdown section (and writes it to ``--markdown``).
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _cpu():
    """``fqss_plugin.export.cpu`` without importing the package (which needs torch and the toolkits)."""
    spec = importlib.util.spec_from_file_location("fqss_cpu", HERE.parent / "fqss_plugin" / "export" / "cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--write-references", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    import onnxruntime as ort
    cpu = _cpu()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    lines = [f"Command: `python {' '.join(shlex.quote(a) for a in ['benchmarks/time_onnx.py', *(argv or sys.argv[1:])])}`",
             "", f"This CPU: {cpu.describe_cpu()}; onnxruntime {ort.__version__}; 1 thread, median of "
             f"{args.repeats} interleaved runs.", ""]
    for folder in args.folders:
        mixture = np.load(folder / "mixture.npy")
        paths = sorted(folder.glob("*.onnx"))
        sessions = {p.stem: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths}
        outputs = {k: s.run(None, {"mixture": mixture})[0] for k, s in sessions.items()}
        if args.write_references:
            for k, out in outputs.items():
                np.save(folder / f"{k}.ref.npy", out)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for round_ in range(args.repeats + 3):
            for k, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {"mixture": mixture})
                if round_ >= 3:
                    times[k].append(1e3 * (time.perf_counter() - start))
        median = {k: statistics.median(v) for k, v in times.items()}
        lines += [f"`{folder.name}` (input {mixture.shape[-1]} samples):", "",
                  "| file | latency (ms) | vs fp32 | output SNR vs the reference machine's |", "|---|---|---|---|"]
        for k in sessions:
            ref = folder / f"{k}.ref.npy"
            if ref.is_file():
                r = np.load(ref).astype(np.float64)
                noise = float(np.sum((r - outputs[k]) ** 2))
                agreement = "identical" if noise == 0 else f"{10 * np.log10(np.sum(r ** 2) / noise):.1f} dB"
            else:
                agreement = "-"
            ratio = f"{median['fp32'] / median[k]:.2f}x" if "fp32" in median else "-"
            lines.append(f"| {k} | {median[k]:.1f} | {ratio} | {agreement} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
