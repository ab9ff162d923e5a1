"""Forward + backward time of QLSTM and QMultiheadAttention vs nn.LSTM and nn.MultiheadAttention.

Each case times one training-mode forward and backward pass (loss = sum of squares of the output)
of the float module and of its prepared copy (W8A8, past calibration, i.e. learning the ranges),
interleaved, median of ``--repeats`` runs after 3 warm-up runs, in one process on the CPU.
Sizes are those of the models that use these modules:

* DPTNet (asteroid defaults: 64 channels, BiLSTM with 256 hidden units, 4 heads, chunk 100):
  the intra-chunk layer sees ``[chunks, 100, 64]``; ``--chunks`` chunks (20 chunks of 100 frames
  with hop 50 are one second of 8 kHz audio at the encoder's stride 8).
* SepFormer (256 channels, 8 heads, chunk 250): the intra-chunk attention sees ``[chunks, 250, 256]``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fqss_plugin as fq  # noqa: E402
from benchmarks.report import command_line, write_section  # noqa: E402

TITLE = "QLSTM and QMultiheadAttention speed"


def lstm_call(module, x):
    return module(x)[0]


def mha_call(module, x):
    return module(x, x, x, need_weights=False)[0]


def fwd_bwd(module, call, x):
    def run():
        module.zero_grad(set_to_none=True)
        call(module, x).pow(2).sum().backward()
    return run


def time_case(float_module, call, x, repeats):
    quantized = fq.prepare(copy.deepcopy(float_module), fq.QuantConfig.vanilla(calib_steps=1))
    quantized(*([x, x, x] if call is mha_call else [x]))       # calibrate on the batch, then learn
    fq.calibration_step(quantized)
    runs = {"float": fwd_bwd(float_module, call, x), "quantized": fwd_bwd(quantized, call, x)}
    times = {name: [] for name in runs}
    for repeat in range(repeats + 3):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if repeat >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=20, help="batch of chunks (sequences) per pass")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.chunks
    cases = [
        ("LSTM, DPTNet intra-chunk: 64 -> 2x256 BiLSTM", nn.LSTM(64, 256, batch_first=True, bidirectional=True),
         lstm_call, torch.randn(b, 100, 64)),
        ("MHA, DPTNet: 64 channels, 4 heads, seq 100", nn.MultiheadAttention(64, 4, batch_first=True),
         mha_call, torch.randn(b, 100, 64)),
        ("MHA, SepFormer: 256 channels, 8 heads, seq 250", nn.MultiheadAttention(256, 8, batch_first=True),
         mha_call, torch.randn(b, 250, 256)),
    ]
    rows = []
    for label, module, call, x in cases:
        medians = time_case(module, call, x, args.repeats)
        ratio = medians["quantized"] / medians["float"]
        rows.append(f"| {label} | {tuple(x.shape)} | {1000 * medians['float']:.1f} | "
                    f"{1000 * medians['quantized']:.1f} | {ratio:.1f}x |")
        print(rows[-1], flush=True)
    body = f"""Command: `{command_line()}`

Training-mode forward + backward of one module (loss = sum of squares of its output), float vs
prepared W8A8 copy past calibration; median of {args.repeats} interleaved runs after 3 warm-up runs,
{args.threads} thread(s), CPU, torch {torch.__version__}. Input `[batch, seq, features]`, batch = {b}
chunks. QLSTM computes the input projection for all time steps in one matmul and loops over the
recurrence in Python with 9 activation quantizers per step and direction; nn.LSTM runs one fused kernel.

| module | input | float ms | quantized ms | quantized / float |
|---|---|---|---|---|
""" + "\n".join(rows)
    print(body)
    if not args.no_write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
