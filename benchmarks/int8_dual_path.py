"""Int8 deployment benchmark of the dual-path recipes, DPTNet (Asteroid) and SepFormer (SpeechBrain): torch
fp32, onnxruntime fp32, onnxruntime int8 (fqss export) and onnxruntime ``quantize_static`` PTQ.

Model: the recipe's shipped float teacher (``pretrained/embedded_float``), then a short FQSS QAT
(``--qat-steps``, the recipe's loss settings) on the embedded Libri2Mix ``train-360``, cached in ``--work-dir``.
Same exporter settings, timing (one 4 s test mixture, interleaved medians), PTQ and SI-SDRi as
``benchmarks/int8_runtime.py``; writes its section of BENCHMARKS.md with the command.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.int8_runtime import (add_run_arguments, cached_qat, dataset, export_float,  # noqa: E402
                                     measure_latency, measure_quality, profile_by_op, profile_shares,
                                     quantize_static_ptq, recipe_loss_settings, runtime_table)
from fqss_plugin.export.cpu import cpu_class, describe_cpu  # noqa: E402
from benchmarks.report import command_line, write_section  # noqa: E402

RECIPES = ROOT / "recipes" / "LibriMix"


def dptnet():
    """(float teacher, its source, QAT loss settings, prepare, load, architecture) of the DPTNet recipe."""
    from fqss_plugin.asteroid import load_float_model
    path = RECIPES / "DPTNet" / "pretrained" / "embedded_float" / "best_model.pth"
    teacher = load_float_model(path).eval()
    masker = teacher.masker
    architecture = (f"64 filters, kernel 32 / stride 16, {len(masker.layers)} dual-path layers of attention and a "
                    f"BiLSTM (hidden {masker.layers[0][0].recurrent.hidden_size}), chunk {masker.chunk_size} / hop "
                    f"{masker.hop_size}; each QLSTM direction an ONNX `Loop` over time, the fp32 file's `nn.LSTM` "
                    "one ONNX `LSTM`")
    return teacher, path, recipe_loss_settings(RECIPES / "DPTNet"), None, None, architecture


def sepformer():
    """The same for the SepFormer recipe (a SpeechBrain inference package, as one ``SepformerWaveform``)."""
    from speechbrain.inference.separation import SepformerSeparation
    from fqss_plugin.speechbrain import SepformerWaveform, prepare_waveform
    path = RECIPES / "SepFormer" / "pretrained" / "embedded_float"
    with tempfile.TemporaryDirectory() as savedir:
        separator = SepformerSeparation.from_hparams(source=str(path), savedir=savedir, run_opts={"device": "cpu"})
    teacher = SepformerWaveform.from_separator(separator).eval()
    text = (RECIPES / "SepFormer" / "hparams" / "sepformer-embedded-fqss.yaml").read_text()
    settings = {"lambda_kd": float(re.search(r"^lambda_kd:\s*([-\d.e]+)", text, re.M).group(1)),
                "average": re.search(r"^loss_average:\s*(\w+)", text, re.M).group(1)}

    def load(cached: Path, float_model, **config_overrides):
        import fqss_plugin as fq
        model = prepare_waveform(copy.deepcopy(float_model), fq.QuantConfig.fqss(**config_overrides))
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model

    masknet = teacher.masknet
    architecture = (f"SpeechBrain's `Dual_Path_Model`: {masknet.num_layers} dual-path layers of transformer blocks, "
                    f"chunk {masknet.K}, encoder kernel {teacher.encoder.conv1d.kernel_size[0]}")
    return teacher, path, settings, prepare_waveform, load, architecture


MODELS = {"dptnet": ("DPTNet", dptnet), "sepformer": ("SepFormer", sepformer)}


def largest_float_initializer(path: Path) -> tuple[int, list[int]]:
    """(bytes, shape) of the largest float32 initializer of the ONNX file at ``path``."""
    import onnx
    tensors = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    largest = max(tensors, key=lambda t: onnx.numpy_helper.to_array(t).nbytes)
    return onnx.numpy_helper.to_array(largest).nbytes, list(largest.dims)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="dptnet")
    add_run_arguments(parser, ROOT / "exp" / "int8_dual_path")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    from fqss_plugin.export import ort_op_report, parity_report, to_onnx

    torch.set_num_threads(1)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    name, build = MODELS[args.model]
    teacher, teacher_path, loss_settings, prepare, load, architecture = build()
    model, qat_meta = cached_qat(teacher, str(teacher_path.relative_to(ROOT)), loss_settings, args.qat_steps,
                                 args.calib_steps, args.work_dir, args.retrain, stem=f"{args.model}_fqss",
                                 prepare=prepare, load=load)
    print(f"QAT: {qat_meta}", flush=True)
    test_set = dataset("test", None)
    if args.eval_mixtures:
        test_set = torch.utils.data.Subset(test_set, range(args.eval_mixtures))
    mixture = test_set[0][0][None, :32000].contiguous()

    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: Path(tmp) / f"{k}.onnx" for k in ("fp32", "int8", "ptq")}
        export_float(teacher, paths["fp32"])
        exported = to_onnx(model, paths["int8"])
        quantize_static_ptq(paths["fp32"], paths["ptq"], [dataset("train-360", 4.0)[i][0].numpy() for i in range(8)])
        latency = measure_latency(teacher, paths, mixture, args.repeats)
        quality = measure_quality(teacher, model, paths, test_set)
        parity = parity_report(model, paths["int8"], mixture)
        ops = ort_op_report(paths["int8"])
        by_op = {k: profile_by_op(paths[k], mixture.numpy()) for k in ("int8", "fp32")}
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        largest_float = largest_float_initializer(paths["int8"])

    shares = {k: profile_shares(v) for k, v in by_op.items()}
    lstm = [q for q in parity.quantizers if ".recurrent.output_quantizers." in q.name]
    lstm_text = (f" The {len(lstm)} BiLSTM outputs differ in at most {max(q.local_differ for q in lstm):.3%} of their "
                 "codes given the same inputs: inside a loop a flip at one step carries to the next ones, so these "
                 "are not single-op figures." if lstm else "")
    n_params = sum(p.numel() for p in teacher.parameters())
    body = f"""Command: `{command_line()}`

{name} of `recipes/LibriMix/{name}` ({n_params:,} parameters; {architecture}). Float weights: its shipped
teacher; FQSS QAT for {qat_meta['qat_steps']} steps ({qat_meta['calib_steps']} calibrating; batch 4 x 1 s, Adam 1e-4,
ranges at 1e-2, lambda_kd {qat_meta['lambda_kd']}, loss average {qat_meta['average']}, {qat_meta.get('qat_seconds', '?')} s)
on the embedded `train-360`. Export: `to_onnx` ({exported.tagged_quantizers} tagged activation quantizers outside any
loop); fp32 baseline: the float model through the same exporter, attention written with the same dynamic-shape ops,
the same clean-up passes. PTQ, timing (one 4 s mixture, median of {args.repeats} interleaved runs after 3 warm-ups)
and SI-SDRi ({len(test_set)} test mixtures) as in the ConvTasNet table; onnxruntime {ort.__version__}.
Machine: {args.machine}; CPU: {describe_cpu()}.

{chr(10).join(runtime_table(latency, sizes, quality))}

Bytes of the int8 file: {', '.join(f'{k} {v:,}' for k, v in sorted(exported.tensor_bytes.items()))}, of which the largest
float32 tensor takes {largest_float[0]:,} B (shape {largest_float[1]}).

Parity (same 4 s mixture): output SNR {parity.snr_db:.1f} dB against the torch fake-quant model; SI-SDRi difference
{abs(quality['int8'] - quality['torch fake-quant']):.4f} dB over the test set. Given onnxruntime's upstream codes, at most
{parity.worst_local_differ:.3%} of a quantizer's codes differ and {parity.worst_local_beyond_1lsb:.3%} by more than 1 LSB.{lstm_text}

What onnxruntime runs (optimized graph, loop bodies included):
- integer kernels: {', '.join(f'{k} x{v}' for k, v in sorted(ops.integer.items()))}
- float compute: {', '.join(f'{k} x{v}' for k, v in sorted(ops.float_compute.items()))}
- profiler, 1 thread, ms per 4 s mixture (a `Loop` node's time includes its body's nodes, which are counted
  again under their own types): int8 {', '.join(f'{k} {v:.1f}' for k, v in shares['int8'].items())};
  fp32 {', '.join(f'{k} {v:.1f}' for k, v in shares['fp32'].items())}.
- largest int8 op types (ms): {', '.join(f'{k} {v:.1f}' for k, v in list(by_op['int8'].items())[:8])};
  fp32: {', '.join(f'{k} {v:.1f}' for k, v in list(by_op['fp32'].items())[:6])}.
"""
    print(body)
    print(parity)
    if not args.no_write:
        write_section(f"Int8 runtime, {name} (ONNX + onnxruntime), {cpu_class()}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
