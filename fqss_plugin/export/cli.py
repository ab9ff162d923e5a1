"""``fqss export`` and ``fqss separate``: the int8 ONNX export and running it on wav files.

``fqss export --checkpoint exp/fqss/best_model.pth --out model.onnx`` (an Asteroid recipe's model package,
or its directory, or a SpeechBrain SepFormer package directory); ``fqss separate --model model.onnx mix.wav [more.wav] --out-dir DIR`` writes
``DIR/<name>_s1.wav ... _s<n>.wav``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXPORT_HELP = "export a trained fqss model package to an int8 ONNX QDQ model for onnxruntime"
SEPARATE_HELP = "separate wav files with an exported ONNX model (onnxruntime)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fqss export``."""
    parser.add_argument("--checkpoint", required=True,
                        help="quantized model package: best_model.pth written by an Asteroid fqss recipe (or its "
                             "directory), or a SpeechBrain SepFormer package directory (hyperparams.yaml)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--decoder", choices=("matmul", "conv"), default="matmul",
                        help="filterbank decoder as an integer MatMul + overlap-add (default) or a float ConvTranspose")
    parser.add_argument("--staged-norm-means", action="store_true",
                        help="take each gLN mean one axis at a time: accurate on long recordings, slower")
    parser.add_argument("--integer-softmax", action="store_true",
                        help="let onnxruntime run the attention softmax as QLinearSoftmax (slower on its CPU provider)")
    parser.add_argument("--report", action="store_true", help="print which ops onnxruntime runs in integer and in float")


def run(args: argparse.Namespace) -> int:
    from .export import to_onnx
    from .runtime import ort_op_report
    try:
        model = _load_quantized(args.checkpoint)
        result = to_onnx(model, args.out, decoder=args.decoder, staged_norm_means=args.staged_norm_means,
                         integer_softmax=args.integer_softmax)
    except (ValueError, FileNotFoundError) as error:       # ExportError is a ValueError
        print(f"fqss export: error: {error}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{k} {v:,} B" for k, v in sorted(result.tensor_bytes.items()))
    print(f"wrote {result.path} ({result.bytes:,} bytes; tensors: {sizes}); {result.n_src} sources"
          + (f" at {result.sample_rate} Hz" if result.sample_rate else ""))
    for note in result.notes:
        print(f"note: {note}")
    if args.report:
        print(ort_op_report(result.path))
    return 0


def _load_quantized(checkpoint: str):
    """A quantized model from a recipe package: a SpeechBrain package directory (``hyperparams.yaml``) or an
    Asteroid package; float or malformed files -> ValueError."""
    if (Path(checkpoint) / "hyperparams.yaml").is_file():
        from ..speechbrain import load_quantized_separator
        return load_quantized_separator(checkpoint)
    from ..asteroid import load_quantized_model
    return load_quantized_model(checkpoint)


def add_separate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the .onnx file written by `fqss export`")
    parser.add_argument("mixtures", nargs="+", help="mono wav files")
    parser.add_argument("--out-dir", required=True, help="directory for <name>_s<k>.wav")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")


def run_separate(args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf

    from .runtime import OrtSeparator
    try:
        separator = OrtSeparator(args.model, threads=args.threads)
    except (ValueError, FileNotFoundError) as error:
        print(f"fqss separate: error: {error}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.mixtures:
        try:
            wav, rate = sf.read(name, dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as error:
            print(f"fqss separate: error: {name}: unreadable audio ({error})", file=sys.stderr)
            return 2
        if wav.shape[1] != 1:
            print(f"fqss separate: error: {name}: {wav.shape[1]} channels, the model separates mono mixtures",
                  file=sys.stderr)
            return 2
        if separator.sample_rate and rate != separator.sample_rate:
            print(f"fqss separate: error: {name}: sample rate {rate} Hz, the model expects {separator.sample_rate} Hz",
                  file=sys.stderr)
            return 2
        estimates = separator.separate(wav[:, 0])
        for k, source in enumerate(estimates, start=1):
            path = out_dir / f"{Path(name).stem}_s{k}.wav"
            sf.write(path, np.asarray(source, np.float32), rate, subtype="FLOAT")
            print(path)
    return 0
