"""Int8 on every CPU: the constructions that avoid the u8 x s8 int16 saturation of x86 CPUs without VNNI, side by side.

For one recipe model (``--model convtasnet|dptnet|sepformer``, the shipped embedded float teacher), three short
FQSS QATs with the same settings (``benchmarks/int8_runtime.py``'s ``cached_qat``): 8-bit weight codes, 7-bit
weight codes, and 7-bit activation codes (scored in torch only: the export writes 8-bit activations), and these
ONNX files:

* ``W8 int8`` -- 8-bit weight codes as int8 (``to_onnx(target="vnni")``): the file every x86 CPU without VNNI
  gets wrong;
* ``W8 uint8`` -- the same model with its weights stored as uint8 (``to_onnx()`` of a W8 model): u8 x u8 kernels,
  exact everywhere;
* ``W7 int8`` -- the 7-bit QAT model (``QuantConfig(weight_bits=7)``), int8 weights within the bound;
* ``fp32`` -- the float teacher through the same exporter.

For each: SI-SDRi on the embedded test set, paired per mixture against the float model (95 % CI), the
saturation guard's verdict (``fqss_plugin.export.saturation``), the output SNR against the torch fake-quant
model natively and under an emulated CPU without VNNI (``qemu-x86_64 -cpu Haswell``,
``fqss_plugin.export.emulate``) on ``--emulated-mixtures`` test mixtures, file size, and latency on this
machine (1 thread, 4 s mixture, interleaved medians). Writes its section of BENCHMARKS.md with the CPU model
and flags.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.int8_runtime import (cached_qat, dataset, export_float, load_teacher, recipe_loss_settings,  # noqa: E402
                                     si_sdr_improvements, time_interleaved)
from benchmarks.report import command_line, publish  # noqa: E402
from fqss_plugin.demo import paired_delta  # noqa: E402

QATS = {"W8": {"weight_bits": 8}, "W7": {"weight_bits": 7}, "W8A7": {"weight_bits": 8, "act_bits": 7}}
"""The QAT runs: 8-bit weight codes, 7-bit weight codes, and 7-bit activation codes (the other construction that
keeps u8 x s8 pairs within int16, ``127 x (127 + 127)``; torch only: the export writes 8-bit activations)."""
VARIANTS = {"W8 int8 (`target=\"vnni\"`)": ("W8", "vnni"), "W8 uint8 weights (`to_onnx()` of a W8 model)": ("W8", "portable"),
            "W7 int8 (`weight_bits=7`, `to_onnx()`)": ("W7", "portable")}


def models():
    from benchmarks.int8_dual_path import dptnet, sepformer

    def convtasnet():
        teacher, source = load_teacher(None)
        return teacher, source, recipe_loss_settings(), None, None
    return {"convtasnet": ("ConvTasNet", convtasnet),
            "dptnet": ("DPTNet", lambda: dptnet()[:5]),
            "sepformer": ("SepFormer", lambda: sepformer()[:5])}


def hub(args) -> int:
    """Latency and size of the hub-size ConvTasNet (seeded weights, calibrated: speed does not depend on the
    values) in each construction, on this CPU; the files stay in ``--work-dir/hub`` (``time_files.py`` times
    them on another machine)."""
    import onnxruntime as ort
    from benchmarks.int8_runtime import calibrated_fqss, hub_stand_in
    from fqss_plugin.export import to_onnx
    from fqss_plugin.export.runtime import session_options
    from fqss_plugin.export.cpu import cpu_class, describe_cpu

    torch.set_num_threads(1)
    work = args.work_dir / "hub"
    work.mkdir(parents=True, exist_ok=True)
    teacher = hub_stand_in()
    paths = {"fp32": work / "fp32.onnx"}
    export_float(teacher, paths["fp32"])
    for name in ("W8", "W7"):
        model = calibrated_fqss(teacher, args.calib_steps, **QATS[name])
        for label, (qat, target) in VARIANTS.items():
            if qat == name:
                paths[label] = work / f"{name.lower()}_{target}.onnx"
                to_onnx(model, paths[label], target=target)
    mixture = dataset("test", None)[0][0][None, :32000].numpy()
    sessions = {k: ort.InferenceSession(str(p), session_options(1), providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    latency = time_interleaved({k: (lambda s=s: s.run(None, {"mixture": mixture})) for k, s in sessions.items()},
                               args.repeats)
    np.save(work / "mixture.npy", mixture)
    rows = ["| file | size | latency 1 thread (ms) | vs ORT fp32 |", "|---|---|---|---|"]
    for key, path in paths.items():
        rows.append(f"| {key} | {path.stat().st_size:,} B | {latency[key]:.1f} | {latency['fp32'] / latency[key]:.2f}x |")
    body = f"""Command: `{command_line()}`

The hub-size ConvTasNet (`JorisCos/ConvTasNet_Libri2Mix_sepclean_8k`'s architecture; seeded weights calibrated for
{args.calib_steps} steps, as in "Int8 deployment: hub-size ConvTasNet"), each construction, on a 4 s mixture, 1 thread,
median of {args.repeats} interleaved runs; onnxruntime {ort.__version__}.
This CPU: {describe_cpu()}; {args.machine}.

{chr(10).join(rows)}
"""
    publish(f"Int8 on every CPU: hub-size ConvTasNet latency, {cpu_class()}", body, not args.no_write)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("convtasnet", "dptnet", "sepformer", "hub"), default="convtasnet",
                        help="hub: latency and size of the hub-size ConvTasNet only")
    parser.add_argument("--qat-steps", type=int, default=150)
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--eval-mixtures", type=int, default=0, help="0: the whole test set")
    parser.add_argument("--emulated-mixtures", type=int, default=10)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "exp" / "int8_portable")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--machine", default="2 cores shared with other jobs (the test suite, data generation)",
                        help="how loaded the machine was, for the report")
    args = parser.parse_args(argv)
    if args.model == "hub":
        return hub(args)

    import onnxruntime as ort
    from fqss_plugin.export import to_onnx
    from fqss_plugin.export.emulate import EMULATED_CPU, run_emulated
    from fqss_plugin.export.runtime import session_options, snr_db
    from fqss_plugin.export.view import WaveformSeparator
    from fqss_plugin.export.cpu import cpu_class, describe_cpu
    from fqss_plugin.export.saturation import saturation_risks

    torch.set_num_threads(1)
    title, build = models()[args.model]
    teacher, source, loss_settings, prepare, load = build()
    source = str(source.relative_to(ROOT)) if isinstance(source, Path) else source
    work = args.work_dir / args.model
    work.mkdir(parents=True, exist_ok=True)
    qat_models, seconds = {}, {}
    for name, overrides in QATS.items():
        qat_models[name], meta = cached_qat(teacher, source, loss_settings, args.qat_steps, args.calib_steps, work,
                                            args.retrain, stem=name.lower(), prepare=prepare, load=load, **overrides)
        seconds[name] = meta.get("qat_seconds")
    test_set = dataset("test", None)
    if args.eval_mixtures:
        test_set = torch.utils.data.Subset(test_set, range(args.eval_mixtures))
    paths = {"fp32": work / "fp32.onnx"}
    export_float(teacher, paths["fp32"])
    risks = {}
    for label, (qat, target) in VARIANTS.items():
        paths[label] = work / f"{qat.lower()}_{target}.onnx"
        result = to_onnx(qat_models[qat], paths[label], target=target)
        risks[label] = len(saturation_risks(onnx.load(str(paths[label]))))
        print(label, result.bytes, result.notes, flush=True)

    mixture = test_set[0][0][None, :32000].contiguous()
    sessions = {k: ort.InferenceSession(str(p), session_options(1), providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    latency = time_interleaved({k: (lambda s=s: s.run(None, {"mixture": mixture.numpy()})) for k, s in sessions.items()},
                               args.repeats)
    with torch.no_grad():
        scores = {"float": si_sdr_improvements(lambda x: teacher(x).numpy(), test_set)}
        for name, model in qat_models.items():
            scores[f"fake-quant {name}"] = si_sdr_improvements(lambda x, model=model: model(x).numpy(), test_set)
    for label in VARIANTS:      # plain sessions: OrtSeparator refuses the VNNI-only file on a CPU without VNNI
        scores[label] = si_sdr_improvements(lambda x, s=sessions[label]: s.run(None, {"mixture": x.numpy()})[0],
                                            test_set)
    print({k: float(np.mean(v)) for k, v in scores.items()}, flush=True)

    subset = [test_set[k] for k in range(min(args.emulated_mixtures, len(test_set)))]
    mixtures = [mix[None].numpy() for mix, _ in subset]
    parity, subset_scores = {}, {}
    for label, (qat, _) in VARIANTS.items():
        with torch.no_grad():
            reference = [WaveformSeparator.frozen(qat_models[qat])(torch.from_numpy(m)).numpy() for m in mixtures]
        native = [sessions[label].run(None, {"mixture": m})[0] for m in mixtures]
        emulated = run_emulated(paths[label], mixtures)
        parity[label] = (min(snr_db(o, r) for o, r in zip(native, reference)),
                         min(snr_db(o, r) for o, r in zip(emulated, reference)))
        for name, outputs in (("native", native), ("emulated", emulated)):      # the task metric on both CPUs
            computed = iter(outputs)
            subset_scores[label, name] = float(np.mean(si_sdr_improvements(lambda _: next(computed), subset)))
        print(label, parity[label], flush=True)

    sizes = {k: p.stat().st_size for k, p in paths.items()}
    rows = ["| file | weights | guard: ops that can saturate | size | SI-SDRi (dB) | vs float (paired, 95% CI) | "
            f"output SNR vs torch, this CPU / emulated no-VNNI (worst of {len(mixtures)}) | SI-SDRi of those {len(mixtures)}, "
            "this CPU / emulated | latency 1 thread (ms) | vs ORT fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows.append(f"| float (torch) | - | - | - | {np.mean(scores['float']):.3f} | - | - | - | - | - |")
    for name in QATS:
        delta, ci = paired_delta(scores[f"fake-quant {name}"], scores["float"])
        rows.append(f"| torch fake-quant {name} (QAT {seconds[name]} s) | - | - | - | "
                    f"{np.mean(scores[f'fake-quant {name}']):.3f} | {delta:+.3f} ± {ci:.3f} | "
                    f"{'reference' if name in ('W8', 'W7') else '-'} | "
                    f"{np.mean(scores[f'fake-quant {name}'][:len(subset)]):.3f} | - | - |")
    rows.append(f"| ORT fp32 | float32 | - | {sizes['fp32']:,} B | - | - | - | - | {latency['fp32']:.1f} | 1.00x |")
    for label, (qat, target) in VARIANTS.items():
        delta, ci = paired_delta(scores[label], scores["float"])
        weights = "int8, codes -128..127" if qat == "W8" and target == "vnni" else \
            "uint8 (zero point 128)" if qat == "W8" else "int8, codes -64..63"
        rows.append(f"| {label} | {weights} | {risks[label]} | {sizes[label]:,} B | {np.mean(scores[label]):.3f} | "
                    f"{delta:+.3f} ± {ci:.3f} | {parity[label][0]:.1f} / **{parity[label][1]:.1f}** dB | "
                    f"{subset_scores[label, 'native']:.3f} / **{subset_scores[label, 'emulated']:.3f}** | "
                    f"{latency[label]:.1f} | {latency['fp32'] / latency[label]:.2f}x |")
    body = f"""Command: `{command_line()}`

{title}: the shipped embedded float teacher ({source}); three FQSS QATs of {args.qat_steps} steps
({args.calib_steps} calibrating, the recipe's loss settings, batch 4 x 1 s, same seed): 8-bit weight codes (W8), 7-bit
weight codes (W7), and 8-bit weights with 7-bit activation codes (W8A7, torch only). SI-SDRi over the {len(test_set)} mixtures of the embedded test set. Output SNR against the
torch fake-quant model of the same QAT, on whole test mixtures, with onnxruntime {ort.__version__} on this CPU and
under `qemu-x86_64 -cpu {EMULATED_CPU}` (AVX2 + FMA, no AVX-512, no VNNI: onnxruntime takes its saturating
u8 x s8 kernels there, as on an AMD Zen 2). Latency: one 4 s mixture, batch 1, median of {args.repeats} interleaved
runs, on this CPU only (times under emulation mean nothing).
This CPU: {describe_cpu()}; {args.machine}.

{chr(10).join(rows)}
"""
    publish(f"Int8 on every CPU: {title}, {cpu_class()}", body, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
