"""The int8 ONNX files of the music models against their torch models: SDR, speed and size.

For each ``--model RECIPE=FQSS_PACKAGE:FLOAT_PACKAGE`` (a quantized package of ``recipes/MUSDB18/<RECIPE>`` and its
float teacher), ``fqss_plugin.export.to_onnx`` writes the int8 file; then on the test tracks of ``--musdb``:

* museval SDR (median over 1 s frames, then over tracks, mean over sources) of the int8 file run by
  onnxruntime (``fqss separate``'s runtime), of the quantized model in torch (fake quantization) and of
  the float teacher, all with ``shifts=0``; the int8 - torch delta is paired per track and source;
* seconds to separate the first test track, one thread each: the float teacher in torch (fp32) and the int8
  file in onnxruntime;
* bytes: the float teacher's fp32 weights and the int8 file.

``--hub``: speed and size only (no quality) of a hub-size HTDemucs, where the convolutions' work dominates, unlike
the toy recipe models: Demucs 4.1's ``HTDemucs`` at its constructor defaults (channels 48, depth 4, nfft 4096, five
cross-domain transformer layers), seeded random weights, prepared with the recipe's ``conf/fqss.yaml`` and
calibrated on the toy MUSDB18-HQ training tracks; speed and size do not depend on the weights' values. Parity is
the SNR of the int8 network's two outputs against the frozen torch network on one segment.

    python benchmarks/music_int8.py \\
        --model HTDemucs=exp/music_table/HTDemucs/fqss/best.th:recipes/MUSDB18/HTDemucs/pretrained/embedded_float/best.th \\
        --model ConvTasNet=exp/music_table/ConvTasNet/fqss/best_model.pth:recipes/MUSDB18/ConvTasNet/pretrained/embedded_float/best_model.pth
    python benchmarks/music_int8.py --hub
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import command_line, publish, repo_path  # noqa: E402
from fqss_plugin.export.cpu import describe_cpu  # noqa: E402

SOURCES = ("drums", "bass", "other", "vocals")


def per_track_source(results: dict) -> list[float]:
    return [row[f"{source}_sdr_median"] for row in results["tracks"] for source in SOURCES]


def seconds(separate, mixture: np.ndarray, rate: int, repeats: int = 2) -> float:
    """The best of ``repeats`` runs of ``separate(mixture [frames, channels], rate)``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        separate(mixture, rate)
        best = min(best, time.perf_counter() - start)
    return best


def measure(recipe: str, quantized_path: Path, float_path: Path, musdb: Path, out: Path) -> dict:
    import musdb as musdb_lib

    from fqss_plugin.demo import paired_delta
    from fqss_plugin.demucs.recipe import separator
    from fqss_plugin.export import to_onnx
    from fqss_plugin.export.registry import package_loader_for
    from fqss_plugin.export.runtime import open_separator
    from fqss_plugin.music_eval import evaluate_musdb

    loader = package_loader_for(quantized_path)
    quantized, teacher = loader.load(str(quantized_path)).eval(), loader.load_float(str(float_path)).eval()
    out.mkdir(parents=True, exist_ok=True)
    result = to_onnx(quantized, out / f"{recipe}.onnx")
    runtime = open_separator(result.path, threads=1, chunk_seconds=30.0)

    def int8(mixture, rate):
        stems = runtime.separate(mixture.T)
        return {source: stem.T for source, stem in zip(runtime.sources, stems)}

    runs = {"float": separator(teacher, shifts=0), "fake_quant": separator(quantized, shifts=0), "int8": int8}
    scores = {name: evaluate_musdb(run, musdb) for name, run in runs.items()}
    values = {name: per_track_source(s) for name, s in scores.items()}
    delta = paired_delta(values["int8"], values["fake_quant"])
    track = musdb_lib.DB(root=str(musdb), is_wav=True, subsets="test")[0]
    mixture = track.audio.astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timing = {"float": seconds(runs["float"], mixture, track.rate), "int8": seconds(int8, mixture, track.rate)}
    finally:
        torch.set_num_threads(threads)
    return {"recipe": recipe, "quantized": repo_path(quantized_path), "teacher": repo_path(float_path),
            "sdr_median": {name: s["sdr_median"] for name, s in scores.items()},
            "int8_minus_fake_quant": {"mean": delta[0], "ci95": delta[1]},
            "track_seconds": len(mixture) / track.rate, "seconds": timing,
            "bytes": {"float_fp32": sum(p.numel() * 4 for p in teacher.parameters()), "int8_onnx": result.bytes},
            "notes": result.notes}


def hub_size(musdb: Path, out: Path, calib_batches: int, write: bool) -> int:
    """Speed, size and parity of a hub-size HTDemucs (module docstring, ``--hub``)."""
    import musdb as musdb_lib
    from demucs.htdemucs import HTDemucs

    import fqss_plugin as fq
    from fqss_plugin.demucs import prepare_model
    from fqss_plugin.demucs.recipe import load_conf, quant_config, separator
    from fqss_plugin.export import ort_op_report, to_onnx
    from fqss_plugin.export.runtime import open_separator, snr_db
    from fqss_plugin.export.view import WaveformSeparator

    torch.manual_seed(0)
    teacher = HTDemucs(sources=list(SOURCES)).eval()
    segment = int(teacher.segment * teacher.samplerate)
    train = musdb_lib.DB(root=str(musdb), is_wav=True, subsets="train")
    batches = [torch.from_numpy(track.audio.T.astype(np.float32))[None, :, :segment] for track in train][:calib_batches]
    if not batches or batches[0].shape[-1] < segment:
        raise SystemExit(f"--hub: needs {calib_batches} training tracks of at least {teacher.segment} s in {musdb}")
    config = quant_config(load_conf([str(REPO / "recipes" / "MUSDB18" / "HTDemucs" / "conf" / "fqss.yaml"),
                                     f"quant.calib_steps={calib_batches}"]))
    quantized = prepare_model(copy.deepcopy(teacher), config).train()
    with torch.no_grad():
        for batch in batches:
            quantized(batch)
            fq.calibration_step(quantized)
    quantized.eval()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = to_onnx(quantized, out / "HTDemucs_hub.onnx")
    export_seconds = time.perf_counter() - started
    report = ort_op_report(result.path)
    runtime = open_separator(result.path, threads=1, chunk_seconds=30.0)
    frozen = WaveformSeparator.frozen(quantized).model
    with torch.no_grad():
        _, _, spec, wave, _, _ = frozen.analyse(batches[0])
        reference = frozen.network(spec, wave)
    outputs = runtime.session.run(None, {"spec": spec.numpy(), "wave": wave.numpy()})
    parity = [snr_db(o, r.numpy()) for o, r in zip(outputs, reference)]
    track = musdb_lib.DB(root=str(musdb), is_wav=True, subsets="test")[0]
    mixture = track.audio.astype(np.float32)

    def int8(mixture, rate):
        return runtime.separate(mixture.T)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timing = {"float": seconds(separator(teacher, shifts=0), mixture, track.rate), "int8": seconds(int8, mixture, track.rate)}
    finally:
        torch.set_num_threads(threads)
    from benchmarks.int8_runtime import profile_by_op, profile_shares
    by_op = profile_by_op(result.path, {"spec": spec.numpy(), "wave": wave.numpy()}, runs=1)
    shares = profile_shares(by_op)
    row = {"parameters": sum(p.numel() for p in teacher.parameters()), "seconds": timing,
           "profile_ms": by_op, "profile_shares_ms": shares,
           "track_seconds": len(mixture) / track.rate, "parity_snr_db": parity, "export_seconds": export_seconds,
           "bytes": {"float_fp32": sum(p.numel() * 4 for p in teacher.parameters()), "int8_onnx": result.bytes},
           "integer_ops": dict(report.integer), "float_ops": dict(report.float_compute)}
    (out / "music_int8_hub.json").write_text(json.dumps(row, indent=1))
    total = sum(by_op.values())
    integer = ", ".join(f"{op} x{n}" for op, n in report.integer.most_common())
    heavy = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"}
    floats = ", ".join(f"{op} x{n}" for op, n in report.float_compute.most_common() if op in heavy) or "none"
    body = (f"Command: `{command_line()}`\n\nCPU: {describe_cpu()}\n\nDemucs 4.1's `HTDemucs` at its constructor "
            f"defaults ({row['parameters'] / 1e6:.1f} M parameters; seeded random weights: no quality figure), "
            f"prepared with `recipes/MUSDB18/HTDemucs/conf/fqss.yaml` and calibrated on {len(batches)} segments of "
            f"the toy training tracks. Seconds to separate the first toy test track ({row['track_seconds']:.0f} s, "
            "stereo, 44.1 kHz, `apply_model` segments with overlap 0.25, shifts 0) with one thread, the best of two "
            "runs.\n\n| | fp32 torch | int8 ONNX (onnxruntime) |\n|---|---|---|\n"
            f"| seconds | {timing['float']:.2f} | {timing['int8']:.2f} |\n"
            f"| weights / file | {row['bytes']['float_fp32'] / 1e6:.1f} MB | {result.bytes / 1e6:.1f} MB |\n\n"
            f"Parity of the int8 network against the frozen torch network (one segment): spectrogram branch "
            f"{parity[0]:.1f} dB, waveform branch {parity[1]:.1f} dB SNR. Integer kernels: {integer}. Convolutions "
            f"and matrix products left in float: {floats}. Export took {export_seconds:.0f} s.\n\n"
            f"onnxruntime profile of the network on one segment (one thread): {total / 1e3:.1f} s; by kind: "
            + ", ".join(f"{kind} {100 * ms / total:.0f} %" for kind, ms in shares.items()) + "; largest op types: "
            + ", ".join(f"{op} {100 * ms / total:.0f} %" for op, ms in list(by_op.items())[:6]) + ".")
    publish("Int8 music models: hub-size HTDemucs (speed and size)", body, write=write)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", metavar="RECIPE=FQSS_PACKAGE:FLOAT_PACKAGE")
    parser.add_argument("--hub", action="store_true", help="speed and size of a hub-size HTDemucs (no quality)")
    parser.add_argument("--calib-batches", type=int, default=4, help="--hub: calibration segments")
    parser.add_argument("--musdb", type=Path, default=REPO / "data" / "musdb18hq")
    parser.add_argument("--out", type=Path, default=REPO / "exp" / "music_int8")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    if args.hub:
        return hub_size(args.musdb.resolve(), args.out, args.calib_batches, write=not args.no_write)
    if not args.model:
        parser.error("give --model RECIPE=FQSS_PACKAGE:FLOAT_PACKAGE (repeatable) or --hub")
    results = []
    for text in args.model:
        recipe, _, paths = text.partition("=")
        quantized, _, teacher = paths.partition(":")
        if not (recipe and Path(quantized).is_file() and Path(teacher).is_file()):
            parser.error(f"--model {text!r}: expected RECIPE=FQSS_PACKAGE:FLOAT_PACKAGE with existing files")
        results.append(measure(recipe, Path(quantized).resolve(), Path(teacher).resolve(), args.musdb.resolve(),
                               args.out))
    (args.out / "music_int8.json").write_text(json.dumps(results, indent=1))
    lines = ["| Model | float SDR | QAT (torch) SDR | int8 ONNX SDR | int8 - torch (paired) | float fp32 s | int8 s "
             "| fp32 weights | int8 file |", "|---|" + "---|" * 8]
    for r in results:
        sdr, d, t, b = r["sdr_median"], r["int8_minus_fake_quant"], r["seconds"], r["bytes"]
        lines.append(f"| {r['recipe']} | {sdr['float']:.2f} | {sdr['fake_quant']:.2f} | {sdr['int8']:.2f} | "
                     f"{d['mean']:+.3f} ± {d['ci95']:.3f} | {t['float']:.2f} | {t['int8']:.2f} | "
                     f"{b['float_fp32'] / 1e6:.2f} MB | {b['int8_onnx'] / 1e6:.2f} MB |")
    body = (f"Command: `{command_line()}`\n\nCPU: {describe_cpu()}\n\nmuseval SDR (dB, as in the music paper table) on "
            f"the toy MUSDB18-HQ test split; seconds to separate its first track ({results[0]['track_seconds']:.0f} s, "
            "stereo, 44.1 kHz) with one thread, the best of two runs: the float teacher in torch and the int8 file "
            "in onnxruntime (HTDemucs: its STFT, mask and iSTFT in torch around the int8 network).\n\n"
            + "\n".join(lines))
    publish("Int8 music models (toy MUSDB18-HQ)", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
