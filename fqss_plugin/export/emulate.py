"""Run an ONNX file on an emulated x86 CPU without VNNI (QEMU user mode), from any x86-64 Linux machine.

``qemu-x86_64 -cpu Haswell`` runs this very Python and onnxruntime on an emulated AVX2 + FMA CPU without
AVX-512 or VNNI, so onnxruntime's CPU detection picks the u8 x s8 kernels that saturate pairs in int16
(:mod:`~fqss_plugin.export.saturation`) exactly as on an AMD Zen 2 or an Intel Haswell-Skylake client part:
the file's *output* on such a CPU can be checked here. Timings under emulation mean nothing.

Needs the ``qemu-x86_64`` program (Debian: ``apt-get install qemu-user``), which ``make`` installs as root.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

EMULATED_CPU = "Haswell"
"""AVX2 + FMA, no AVX-512, no VNNI: the saturating u8 x s8 path."""

_RUNNER = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
inputs = np.load(sys.argv[2])
outputs = {}
for k in sorted({key.split("_")[0] for key in inputs.files}):
    feed = {name: inputs[f"{k}_{j}"] for j, name in enumerate(names) if f"{k}_{j}" in inputs.files}
    outputs.update({f"{k}_{j}": out for j, out in enumerate(session.run(None, feed))})
np.savez(sys.argv[3], **outputs)
"""


def qemu() -> str | None:
    """The path of ``qemu-x86_64`` on an x86-64 Linux machine, else None."""
    import platform
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return shutil.which("qemu-x86_64")


def run_emulated(path: str | Path, inputs: list, cpu: str = EMULATED_CPU, timeout: float = 1800) -> list:
    """Outputs of the ONNX model at ``path`` for each of ``inputs``, computed by onnxruntime on an emulated
    ``cpu`` (one process for all inputs). An input is a ``float32`` array, fed to the model's first input, whose
    result is the first output; or a tuple of arrays, fed to the inputs in order, whose result is the list of
    all outputs."""
    program = qemu()
    if program is None:
        raise RuntimeError("emulating a CPU without VNNI needs qemu-x86_64 on an x86-64 Linux machine "
                           "(Debian: apt-get install qemu-user)")
    with tempfile.TemporaryDirectory() as tmp:
        feed, out = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        arrays = {f"x{k:06d}_{j}": np.ascontiguousarray(a, np.float32)
                  for k, x in enumerate(inputs) for j, a in enumerate(x if isinstance(x, tuple) else (x,))}
        np.savez(feed, **arrays)
        done = subprocess.run([program, "-cpu", cpu, sys.executable, "-c", _RUNNER, str(path), str(feed), str(out)],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "TCG doesn't support" not in line]
            raise RuntimeError(f"onnxruntime under qemu-x86_64 -cpu {cpu} failed on {path}: " + "\n".join(errors[-5:]))
        with np.load(out) as outputs:
            results = [[outputs[key] for key in sorted(outputs.files, key=lambda key: int(key.split("_")[1]))
                        if key.startswith(f"x{k:06d}_")] for k in range(len(inputs))]
        return [result if isinstance(x, tuple) else result[0] for x, result in zip(inputs, results)]
