"""Training step time of a prepared (quantized) model vs the float model.

One step = forward + backward + optimizer step on the same batch. The FQSS step also runs the
float teacher's forward pass (no grad) and the FQSS loss, as in training. Timings are medians of
``--repeats`` interleaved runs after warm-up, on the CPU with the current thread settings.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fqss_plugin as fq  # noqa: E402
from benchmarks.report import command_line, write_section  # noqa: E402
from tests.toy_models import ToySeparator  # noqa: E402


def make_step(model, teacher, loss_fn, mix, target):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        teacher_estimate = None
        if teacher is not None:
            with torch.no_grad():
                teacher_estimate = teacher(mix)
        loss = loss_fn(model(mix), target, teacher_estimate)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0, help="segment length at 8 kHz")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    float_model = ToySeparator(n_filters=128, bottleneck=64, hidden=128, blocks=6)
    length = int(args.seconds * 8000)
    mix = torch.randn(args.batch, length) * 0.1
    target = torch.randn(args.batch, 2, length) * 0.1
    config = fq.QuantConfig.fqss(calib_steps=1)
    student = fq.prepare(copy.deepcopy(float_model), config, encoder="encoder", decoder="decoder")
    vanilla = fq.prepare(copy.deepcopy(float_model), fq.QuantConfig.vanilla(calib_steps=1),
                         encoder="encoder", decoder="decoder")
    teacher = copy.deepcopy(float_model).eval()
    steps = {
        "float": make_step(float_model, None, fq.FQSSLoss(0.0), mix, target),
        "vanilla QAT": make_step(vanilla, None, fq.FQSSLoss(0.0), mix, target),
        "FQSS QAT (+ teacher)": make_step(student, teacher, fq.FQSSLoss(0.1), mix, target),
    }
    for model in (student, vanilla):         # past calibration: time the learning phase
        model(mix)
        fq.calibration_step(model)
    times = {name: [] for name in steps}
    for repeat in range(args.repeats + 3):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if repeat >= 3:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    params = sum(p.numel() for p in float_model.parameters())
    rows = [f"| {name} | {1000 * m:.1f} | {m / medians['float']:.2f}x |" for name, m in medians.items()]
    body = f"""Command: `{command_line()}`

ConvTasNet-like model (`tests/toy_models.py::ToySeparator`, {params:,} parameters: 128 filters, kernel 16,
6 TCN blocks, bottleneck 64, hidden 128), batch {args.batch} x {args.seconds:g} s at 8 kHz, Adam step,
{args.threads} threads, median of {args.repeats} interleaved steps after 3 warm-up steps.

| step | median ms | vs float |
|---|---|---|
""" + "\n".join(rows) + f"""

Goal: FQSS step <= 2.0x the float step, teacher forward included.
Measured on: {torch.__version__}, {torch.get_num_threads()} threads."""
    print(body)
    write_section("QAT step-time overhead", body)


if __name__ == "__main__":
    main()
