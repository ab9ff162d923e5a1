"""OpenVINO's CPU runtime beside onnxruntime on the same ONNX files (fp32 and the int8 constructions).

OpenVINO reads ONNX QDQ graphs and runs them with its own int8 kernels; it is a candidate second backend
behind ``OrtSeparator``'s interface where it is faster. It is not a dependency of fqss: install it in the
venv first (``.venv/bin/pip install openvino``). Input: the folder of ONNX files that
``benchmarks/int8_portable.py --model convtasnet|hub`` leaves in ``exp/int8_portable/<model>``. Latency: one
4 s test mixture, batch 1, 1 thread (OpenVINO: one stream, f32 inference precision so that its float
parts match), median of ``--repeats`` interleaved runs; agreement: output SNR of OpenVINO against
onnxruntime on the same file. Writes its section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.int8_runtime import dataset, time_interleaved  # noqa: E402
from benchmarks.report import command_line, publish, repo_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=ROOT / "exp" / "int8_portable" / "convtasnet")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--machine", default="2 cores shared with other jobs")
    args = parser.parse_args(argv)
    try:
        import openvino as ov
    except ImportError:
        print("this benchmark needs OpenVINO: .venv/bin/pip install openvino", file=sys.stderr)
        return 2
    import onnxruntime as ort
    from fqss_plugin.export.runtime import session_options, snr_db
    from fqss_plugin.export.cpu import describe_cpu

    paths = sorted(args.folder.glob("*.onnx"))
    if not paths:
        print(f"{args.folder}: no .onnx files (run benchmarks/int8_portable.py first)", file=sys.stderr)
        return 2
    mixture = dataset("test", None)[0][0][None, :32000].numpy()
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1})
    runners, failed = {}, {}
    for path in paths:
        session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        runners[("onnxruntime", path.name)] = lambda s=session: s.run(None, {"mixture": mixture})[0]
        try:
            model = core.read_model(str(path))
            model.reshape({"mixture": list(mixture.shape)})
            request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
            runners[("openvino", path.name)] = lambda r=request: r.infer({"mixture": mixture})[0]
        except Exception as error:  # noqa: BLE001 - report any refusal of the file
            failed[path.name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    outputs = {key: np.asarray(run()) for key, run in runners.items()}
    latency = time_interleaved(runners, args.repeats)
    rows = ["| file | onnxruntime (ms) | OpenVINO (ms) | OpenVINO vs onnxruntime | OpenVINO output vs onnxruntime |",
            "|---|---|---|---|---|"]
    for path in paths:
        ort_ms = latency[("onnxruntime", path.name)]
        if path.name in failed:
            rows.append(f"| {path.name} | {ort_ms:.1f} | refused: {failed[path.name]} | - | - |")
            continue
        ov_ms = latency[("openvino", path.name)]
        agreement = snr_db(outputs[("openvino", path.name)], outputs[("onnxruntime", path.name)])
        rows.append(f"| {path.name} | {ort_ms:.1f} | {ov_ms:.1f} | {ort_ms / ov_ms:.2f}x | {agreement:.1f} dB SNR |")
    body = f"""Command: `{command_line()}`

Files of `{repo_path(args.folder)}` (from `benchmarks/int8_portable.py`); one 4 s mixture, batch 1, 1 thread, median of
{args.repeats} interleaved runs; onnxruntime {ort.__version__}, OpenVINO {ov.__version__}.
This CPU: {describe_cpu()}; {args.machine}.

{chr(10).join(rows)}
"""
    publish(f"OpenVINO beside onnxruntime ({args.folder.name})", body, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
