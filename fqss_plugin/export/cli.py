"""``fqss export`` and ``fqss separate``: the int8 ONNX export and running it on wav files.

``fqss export --checkpoint exp/fqss/best_model.pth --out model.onnx`` takes a trained model package of
any installed toolkit adapter (:func:`fqss_plugin.export.registry.package_loader_for`: an Asteroid
recipe's ``best_model.pth`` or its directory, a SpeechBrain SepFormer package directory);
``fqss separate --model model.onnx mix.wav [more.wav] --out-dir DIR`` writes ``DIR/<name>_s1.wav ... _s<n>.wav``,
or, for a model with named sources (a music model), ``DIR/<name>_drums.wav ...`` with the model's channels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    parser.add_argument("--target", choices=("portable", "vnni"), default="portable",
                        help="portable (default): the same output on every CPU (weights that could saturate the "
                             "int16 pairs of x86 CPUs without VNNI are stored as uint8); vnni: int8 weights as "
                             "trained, for CPUs with VNNI or ARM dot products only (refused elsewhere)")
    parser.add_argument("--int4-weights", action="store_true",
                        help="store weight codes of at most 4 bits as ONNX INT4, two per byte (opset 21): half the "
                             "weights' size; onnxruntime runs those layers in float after dequantizing")
    parser.add_argument("--report", action="store_true", help="print which ops onnxruntime runs in integer and in float")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--trust-package", action="store_true",
                        help="load a SpeechBrain package directory: its hyperparams.yaml is executed (hyperpyyaml "
                             "can run any Python), so only for packages you trust")


def run(args: argparse.Namespace) -> int:
    from .export import to_onnx
    from .runtime import ort_op_report
    out, checkpoint = Path(args.out), Path(args.checkpoint)
    problem = ("is the checkpoint itself" if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve()
               else "is a directory" if out.is_dir()
               else "exists (pass --overwrite to replace it)" if out.exists() and not args.overwrite
               else None)
    if problem:
        print(f"fqss export: error: --out {out} {problem}", file=sys.stderr)
        return 2
    from .registry import load_quantized_package
    try:
        model = load_quantized_package(args.checkpoint, args.trust_package)
        int8_path = out.with_name(f".{out.name}.int8.tmp") if args.int4_weights else out
        try:
            result = to_onnx(model, int8_path, decoder=args.decoder, staged_norm_means=args.staged_norm_means,
                             integer_softmax=args.integer_softmax, target=args.target)
            if args.int4_weights:
                from .int4 import write_int4_file
                packed = write_int4_file(int8_path, out)
                result.path, result.bytes, result.tensor_bytes = out, out.stat().st_size, packed["tensor_bytes"]
                result.notes.append(f"{packed['packed']} weight tensors stored as INT4")
        finally:
            if args.int4_weights:
                int8_path.unlink(missing_ok=True)
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


def add_separate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the .onnx file written by `fqss export`")
    parser.add_argument("mixtures", nargs="+", help="wav files with the model's channels (speech models: mono)")
    parser.add_argument("--out-dir", required=True, help="directory for <name>_s<k>.wav (or <name>_<source>.wav)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    parser.add_argument("--chunk-seconds", type=float, default=30.0,
                        help="separate longer recordings in chunks of this length, overlapping by 1 s (bounded "
                             "memory; default 30); 0: in one piece")
    parser.add_argument("--sample-rate", type=int, default=None,
                        help="the model's sample rate, for an ONNX file without fqss metadata")


def _output_plan(mixtures: list[str], out_dir: Path, suffixes: list[str], overwrite: bool) -> list[list[Path]] | str:
    """The output paths of each mixture (``<stem>_<suffix>.wav``), or why they cannot be written (checked before
    any work)."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"--out-dir {out_dir} is a file"
    inputs = {Path(m).resolve(): m for m in mixtures}
    plan, owner = [], {}
    for name in mixtures:
        paths = [out_dir / f"{Path(name).stem}_{suffix}.wav" for suffix in suffixes]
        for path in paths:
            key = path.resolve()
            if key in inputs:
                return f"{path} would overwrite the input {inputs[key]}; choose another --out-dir"
            if key in owner:
                return f"{owner[key]} and {name} would both write {path}; separate them into different --out-dir"
            if path.exists() and not overwrite:
                return f"{path} exists (pass --overwrite to replace it)"
            owner[key] = name
        plan.append(paths)
    return plan


def run_separate(args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf

    from ..atomic import atomic_path
    from .runtime import open_separator

    def fail(message: str) -> int:
        print(f"fqss separate: error: {message}", file=sys.stderr)
        return 2
    try:
        separator = open_separator(args.model, threads=args.threads, chunk_seconds=args.chunk_seconds or None)
    except (ValueError, FileNotFoundError) as error:
        return fail(str(error))
    rate_expected = separator.sample_rate or args.sample_rate
    if rate_expected is None:
        return fail(f"{args.model} has no sample_rate in its metadata (not written by `fqss export`); "
                    "pass --sample-rate")
    separator.sample_rate = rate_expected
    out_dir = Path(args.out_dir)
    suffixes = separator.sources or [f"s{k}" for k in range(1, (separator.n_src or 2) + 1)]
    plan = _output_plan(args.mixtures, out_dir, suffixes, args.overwrite)
    if isinstance(plan, str):
        return fail(plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, paths in zip(args.mixtures, plan):
        try:
            wav, rate = sf.read(name, dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as error:
            return fail(f"{name}: unreadable audio ({error})")
        channels = separator.audio_channels
        if wav.shape[1] != channels:
            return fail(f"{name}: {wav.shape[1]} channels, the model separates "
                        + ("mono mixtures" if channels == 1 else f"{channels}-channel mixtures"))
        if rate != rate_expected:
            return fail(f"{name}: sample rate {rate} Hz, the model expects {rate_expected} Hz")
        bad = int(np.size(wav) - np.isfinite(wav).sum())
        if bad:
            return fail(f"{name}: {bad} NaN/Inf samples; the input normalisation would spread them over the output")
        try:
            estimates = separator.separate(wav[:, 0] if channels == 1 else wav.T)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types (e.g. input shorter than a kernel)
            return fail(f"{name}: the model cannot run on these {len(wav)} samples ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200] if str(error) else ''})")
        for path, source in zip(paths, estimates):
            with atomic_path(path) as tmp:
                sf.write(tmp, np.asarray(source, np.float32).T, rate, subtype="FLOAT", format="WAV")
            print(path)
    return 0
