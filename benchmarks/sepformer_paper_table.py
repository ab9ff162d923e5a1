"""SepFormer row of the paper table: float vs vanilla QAT vs FQSS, SpeechBrain recipe, embedded Libri2Mix.

Everything runs through the recipe (``recipes/LibriMix/SepFormer/train.py``, in-process) with the
embedded-size hparams (``sepformer-embedded-{float,vanilla,fqss}.yaml``):

1. step time: the recipe Brain's ``fit_batch`` of the three Brains, interleaved, on the same batch,
   past calibration (the FQSS step includes the float teacher's forward pass);
2. the float SepFormer is trained from scratch (``--budget`` x ``--float-share`` minutes), or, with
   ``--float-run``, a finished float run of the recipe is taken as it is (the shipped teacher was made
   that way: ``recipes/LibriMix/SepFormer/pretrained/embedded_float/README.md``);
3. vanilla QAT and FQSS QAT start from its ``pretrained/`` package and take the same number of
   optimizer steps (the rest of the budget); "float +" continues the float run from its last
   checkpoint for that many steps too (at this budget the float model is not converged, and the
   QAT runs also keep training it: "float +" is the reference that separates the two effects);
4. every model is scored by the recipe's ``test_results.csv`` (SI-SNR(i), SDR(i)) on the same test
   mixtures; deltas vs float are paired per mixture, with 95 % confidence intervals.

The number of steps follows from the budget and the measured step times, so the figures say how
much training they got. The embedded data is synthetic speech: these are not LibriMix numbers.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import command_line, repo_path, write_section  # noqa: E402
from fqss_plugin.data.librimix import prepare_librimix_csv  # noqa: E402
from fqss_plugin.data.speech import SpeechConfig, generate_speech  # noqa: E402

RECIPE = REPO / "recipes" / "LibriMix" / "SepFormer"
MODES = ("float", "vanilla", "fqss")
LABELS = {"float": "Float", "vanilla": "Vanilla QAT 8-bit", "fqss": "FQSS 8-bit", "float_more": "Float +"}
METRICS = ("si-snr_i", "sdr_i", "si-snr", "sdr")


def load_recipe():
    spec = importlib.util.spec_from_file_location("sepformer_recipe_train", RECIPE / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hparams_file(mode: str) -> str:
    return str(RECIPE / "hparams" / f"sepformer-embedded-{mode}.yaml")


def write_subset(full: Path, out: Path, count: int, seed: int = 0) -> Path:
    """The first ``count`` rows of a fixed random permutation of a recipe manifest (all if count <= 0)."""
    with open(full, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if 0 < count < len(rows):
        random.Random(seed).shuffle(rows)
        rows = rows[:count]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def measure_step_times(libri2mix: Path, work: Path, repeats: int, batch_size: int, segment: int) -> dict:
    """Median seconds of ``fit_batch`` per mode (interleaved), on one batch of real training mixtures."""
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    with open(work / "manifests" / "libri2mix_train-360.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:batch_size]
    signals = {key: torch.stack([sb.dataio.dataio.read_audio(row[f"{key}_wav"])[:segment] for row in rows])
               for key in ("mix", "s1", "s2")}

    class Batch:
        pass

    batch = Batch()
    lengths = torch.ones(batch_size)
    for key, value in signals.items():
        setattr(batch, f"{key}_sig", (value, lengths))
    brains = {}
    for mode in MODES:
        overrides = {"data_folder": str(libri2mix), "output_folder": str(work / "step_time" / mode)}
        if mode != "float":
            overrides["calib_steps"] = 1                  # time the learning phase, the bulk of QAT
        with open(hparams_file(mode)) as handle:
            hparams = load_hyperpyyaml(handle, overrides)
        brain = load_recipe().Separation(modules=hparams["modules"], opt_class=hparams["optimizer"],
                                         hparams=hparams, run_opts={"device": "cpu"}, checkpointer=None)
        brain.on_fit_start()
        brain.on_stage_start(sb.Stage.TRAIN)
        brains[mode] = brain
    times = {mode: [] for mode in MODES}
    for repeat in range(repeats + 2):
        for mode, brain in brains.items():
            start = time.perf_counter()
            brain.fit_batch(batch)
            if repeat >= 2:
                times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(t) for mode, t in times.items()}


def plan(steps: int, train_count: int, batch_size: int) -> tuple[int, int]:
    """(epochs, training mixtures) giving about ``steps`` optimizer steps."""
    per_epoch = max(1, train_count // batch_size)
    if steps <= per_epoch:
        return 1, max(batch_size, steps * batch_size)
    epochs = max(1, round(steps / per_epoch))
    return epochs, train_count


def read_results(out: Path) -> dict[str, dict]:
    with open(out / "test_results.csv", newline="") as handle:
        return {row["snt_id"]: {m: float(row[m]) for m in METRICS} for row in csv.DictReader(handle)
                if row["snt_id"] != "avg"}


def paired(quantized: list[float], reference: list[float]) -> tuple[float, float]:
    deltas = torch.tensor(quantized) - torch.tensor(reference)
    half = 1.96 * float(deltas.std(unbiased=True)) / math.sqrt(len(deltas)) if len(deltas) > 1 else float("nan")
    return float(deltas.mean()), half


def yaml_keys(path: str, keys: tuple[str, ...]) -> dict[str, str]:
    """Top-level ``key: value`` lines of a hyperpyyaml file (the values as written; missing keys left out)."""
    found = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key in keys:
            found[key] = value.split("#")[0].strip()
    return found


def use_float_run(run: Path, float_dir: Path) -> None:
    """Make a finished float run of the recipe this benchmark's float model (a link, and its ``run.json``)."""
    run = run.resolve()
    missing = [p for p in ("pretrained", "save", "test_results.csv", "train_log.txt") if not (run / p).exists()]
    if missing:
        raise SystemExit(f"--float-run {run}: not a finished float run of the recipe (missing {', '.join(missing)})")
    if float_dir.is_symlink() or float_dir.exists():
        if float_dir.resolve() == run:
            return
        raise SystemExit(f"{float_dir} exists and is not {run}: remove it or pick another --out")
    float_dir.parent.mkdir(parents=True, exist_ok=True)
    float_dir.symlink_to(run, target_is_directory=True)
    # its epochs (float + continues from there); its training data is in its own hyperparams.yaml
    epochs = sum(1 for line in (run / "train_log.txt").read_text().splitlines() if line.startswith("epoch:"))
    (run / "run.json").write_text(json.dumps({"epochs": epochs, "source": str(run)}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "librimix",
                        help="embedded data directory (holds Libri2Mix/); generated if missing")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "sepformer_paper_table")
    parser.add_argument("--budget", type=float, default=40.0, help="training minutes for the three models")
    parser.add_argument("--float-share", type=float, default=0.6, help="share of the budget for the float model")
    parser.add_argument("--valid-mixtures", type=int, default=30, help="dev mixtures for checkpoint selection")
    parser.add_argument("--test-mixtures", type=int, default=0, help="test mixtures scored (0 = all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-repeats", type=int, default=8)
    parser.add_argument("--float-run", type=Path, default=None,
                        help="a finished float run of the recipe (its output folder: save/, pretrained/, "
                             "test_results.csv) to quantize instead of training one; --budget is then QAT only")
    parser.add_argument("--qat-epochs", type=int, default=None,
                        help="with --float-run: QAT epochs over the train split (default: from --budget)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs in --out (run.json + test_results.csv) and the measured step times")
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not 0 < args.float_share < 1:
        parser.error(f"--float-share must be in (0, 1), got {args.float_share}")
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 minutes, got {args.budget}")
    torch.set_num_threads(args.threads)
    start = time.time()

    libri2mix = args.data / "Libri2Mix"
    if not (libri2mix / "wav8k" / "min" / "test").is_dir():
        print(f"generating the embedded Libri2Mix in {args.data}")
        generate_speech(SpeechConfig(out=args.data))
    work = args.out.resolve()
    manifests = work / "manifests"
    prepare_librimix_csv(libri2mix, manifests, fs=8000)
    train_full = manifests / "libri2mix_train-360.csv"
    with open(train_full) as handle:
        train_count = sum(1 for _ in handle) - 1
    valid = write_subset(manifests / "libri2mix_dev.csv", manifests / "valid_subset.csv", args.valid_mixtures)
    test = write_subset(manifests / "libri2mix_test.csv", manifests / "test_subset.csv", args.test_mixtures)

    batch_size, segment = 2, 16000       # sepformer-embedded-*.yaml: batch_size, training_signal_len
    step_file = work / "step_time.json"
    if args.reuse and step_file.is_file():
        step = json.loads(step_file.read_text())
        print("[1/5] step time: reusing " + ", ".join(f"{m} {1000 * s:.0f} ms" for m, s in step.items()))
    else:
        print("[1/5] step time (fit_batch, interleaved, past calibration)")
        step = measure_step_times(libri2mix, work, args.step_repeats, batch_size, segment)
        step_file.write_text(json.dumps(step))
        print("      " + ", ".join(f"{m} {1000 * s:.0f} ms" for m, s in step.items()))

    budget_s = args.budget * 60
    float_share = 0.0 if args.float_run else args.float_share
    float_steps = int(float_share * budget_s / step["float"])
    qat_steps = int((1 - float_share) * budget_s / (step["vanilla"] + step["fqss"]))
    if args.qat_epochs:
        qat_steps = args.qat_epochs * (train_count // batch_size)
    if args.float_run:
        use_float_run(args.float_run, work / "float")
    recipe = load_recipe()
    common = ["--data_folder", str(libri2mix), "--device", "cpu", "--noprogressbar", "--valid_data", str(valid),
              "--test_data", str(test)]
    runs = {}
    for index, mode in enumerate(MODES + ("float_more",), start=2):
        out = work / mode
        if mode == "float" and args.float_run:
            runs[mode] = json.loads((out / "run.json").read_text())
            print(f"[{index}/5] {LABELS[mode]}: the finished run {args.float_run}")
            continue
        if args.reuse and (out / "run.json").is_file() and (out / "test_results.csv").is_file():
            runs[mode] = json.loads((out / "run.json").read_text())
            print(f"[{index}/5] {LABELS[mode]}: reusing {out}")
            continue
        hparams, extra = hparams_file("float" if mode == "float_more" else mode), []
        if mode == "float_more":
            # the float recipe continued from its last checkpoint for as many steps as each QAT run takes
            epochs, count = runs["fqss"]["epochs"], runs["fqss"]["train_mixtures"]
            last = max((work / "float" / "save").glob("CKPT+*"))
            shutil.copytree(last, out / "save" / last.name, dirs_exist_ok=True)
            extra = ["--N_epochs", str(runs["float"]["epochs"] + epochs)]
        else:
            epochs, count = plan(float_steps if mode == "float" else qat_steps, train_count, batch_size)
            extra = ["--N_epochs", str(epochs)]
            if mode != "float":
                extra += ["--pretrained_path", str(work / "float" / "pretrained")]
        train = write_subset(train_full, manifests / f"train_{mode}.csv", count if count < train_count else 0)
        runs[mode] = {"epochs": epochs, "train_mixtures": count, "steps": epochs * (count // batch_size)}
        print(f"[{index}/5] {LABELS[mode]}: {epochs} epoch(s) x {count} mixtures (~{runs[mode]['steps']} steps)")
        tic = time.time()
        recipe.main([hparams, "--output_folder", str(out), "--train_data", str(train), *common, *extra])
        runs[mode]["wall_min"] = (time.time() - tic) / 60
        (out / "run.json").write_text(json.dumps(runs[mode]))

    everything = MODES + ("float_more",)
    results = {mode: read_results(work / mode) for mode in everything}
    ids = sorted(results["float"])
    table = {mode: {m: statistics.fmean(results[mode][i][m] for i in ids) for m in METRICS} for mode in everything}
    deltas = {(mode, ref): {m: paired([results[mode][i][m] for i in ids], [results[ref][i][m] for i in ids])
                            for m in ("si-snr_i", "sdr_i")}
              for mode in ("vanilla", "fqss") for ref in ("float", "float_more")}
    fqss_vs_vanilla = paired([results["fqss"][i]["si-snr_i"] for i in ids],
                             [results["vanilla"][i]["si-snr_i"] for i in ids])
    summary = {"step_time_s": step, "runs": runs, "test_mixtures": len(ids), "means": table,
               "delta": {f"{m} - {r}": v for (m, r), v in deltas.items()},
               "fqss_minus_vanilla_si_snr_i": fqss_vs_vanilla, "wall_time_min": (time.time() - start) / 60,
               "command": command_line(), "torch": torch.__version__, "threads": args.threads}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))

    def delta(mode: str, metric: str, ref: str = "float") -> str:
        mean, half = deltas[(mode, ref)][metric]
        return f"{mean:+.2f} ± {half:.2f}"

    vanilla_gap, vanilla_half = deltas[("vanilla", "float_more")]["si-snr_i"]
    fqss_teacher, _ = deltas[("fqss", "float")]["si-snr_i"]
    reading = []
    if abs(vanilla_gap) <= vanilla_half:
        reading.append("Vanilla QAT is within noise of float +: at this training level 8-bit quantization is not what "
                       "limits quality, so this run cannot show the vanilla loss the paper reports (a converged float "
                       "model is needed).")
    float_gain, float_gain_half = paired([results["float_more"][i]["si-snr_i"] for i in ids],
                                         [results["float"][i]["si-snr_i"] for i in ids])
    if float_gain > float_gain_half:
        reading.append(f"The float model is not converged: the same steps in float gain {float_gain:+.2f} ± "
                       f"{float_gain_half:.2f} dB (float + vs float), so the QAT runs' deltas mix quantization "
                       "damage with training they did not get.")
    if abs(fqss_teacher) <= 0.15:
        reading.append(f"FQSS stays within {abs(fqss_teacher):.2f} dB of its teacher (the float column): the goal "
                       "FQSS - float >= -0.15 dB is met against the teacher it was quantized from.")
    float_run = runs["float"]
    if args.float_run:
        float_source = (f"Float: the finished recipe run `{repo_path(args.float_run)}` ({float_run['epochs']} epochs; how it "
                        "was trained: its README / `train_log.txt`).")
    else:
        float_source = (f"Training budget {args.budget:g} min: float from scratch {float_run['epochs']} epoch(s) x "
                        f"{float_run['train_mixtures']} mixtures (~{float_run['steps']} steps).")
    fqss_settings = ", ".join(f"{key} {value}" for key, value in {
        **yaml_keys(str(REPO / "hparams" / "fqss.yaml"), ("decoder_in_splits", "encoder_out_splits")),
        **yaml_keys(hparams_file("fqss"), ("lambda_kd", "loss_average"))}.items())
    walls = ", ".join(f"{LABELS[m]} {runs[m]['wall_min']:.0f} min" for m in everything if "wall_min" in runs[m])
    reused = (" (`--reuse`: the runs and step times of an earlier invocation with the same `--out` are kept; each "
              "run's `run.json` records its epochs, mixtures and wall time)" if args.reuse else "")
    body = f"""Command: `{command_line()}`{reused}

Script: `benchmarks/sepformer_paper_table.py` (the SpeechBrain recipe `recipes/LibriMix/SepFormer`, in-process).
Model: `sepformer-embedded-*.yaml` (SepFormer, 64 channels, 4 heads, FFN 128, 1 transformer layer per intra/inter
block, 2 dual-path stages, K = 100; kernel 16, stride 8), batch {batch_size} x {segment / 8000:g} s segments, Adam,
{args.threads} thread(s), CPU shared with other jobs. Data: embedded Libri2Mix (`fqss make-data speech`, synthetic
voices; **not LibriMix numbers**), {len(ids)} test mixtures, checkpoint chosen on {args.valid_mixtures} dev mixtures.
{float_source} Vanilla and FQSS QAT from it, each {runs['fqss']['epochs']} epoch(s) x
{runs['fqss']['train_mixtures']} mixtures (~{runs['fqss']['steps']} steps, calibration: 100 steps, lr 1e-4; FQSS: {fqss_settings}).
"Float +" is the float run continued from its last checkpoint for the same number of steps (its own lr): what
the extra steps alone give, the fair reference when the float model is not converged.

| SepFormer (SpeechBrain) | Float | Float + | Vanilla QAT 8-bit | FQSS 8-bit |
|---|---|---|---|---|
| SI-SNRi (dB) | {table['float']['si-snr_i']:.2f} | {table['float_more']['si-snr_i']:.2f} | {table['vanilla']['si-snr_i']:.2f} | {table['fqss']['si-snr_i']:.2f} |
| SDRi (dB) | {table['float']['sdr_i']:.2f} | {table['float_more']['sdr_i']:.2f} | {table['vanilla']['sdr_i']:.2f} | {table['fqss']['sdr_i']:.2f} |
| SI-SNRi vs float, paired (95 % CI) | - | - | {delta('vanilla', 'si-snr_i')} | {delta('fqss', 'si-snr_i')} |
| SI-SNRi vs float +, paired (95 % CI) | - | - | {delta('vanilla', 'si-snr_i', 'float_more')} | {delta('fqss', 'si-snr_i', 'float_more')} |
| SDRi vs float +, paired (95 % CI) | - | - | {delta('vanilla', 'sdr_i', 'float_more')} | {delta('fqss', 'sdr_i', 'float_more')} |
| training step (`fit_batch`, median ms) | {1000 * step['float']:.0f} | {1000 * step['float']:.0f} | {1000 * step['vanilla']:.0f} | {1000 * step['fqss']:.0f} |
| step time vs float | 1.00x | 1.00x | {step['vanilla'] / step['float']:.2f}x | {step['fqss'] / step['float']:.2f}x |

FQSS - vanilla (SI-SNRi, paired): {fqss_vs_vanilla[0]:+.2f} ± {fqss_vs_vanilla[1]:.2f} dB. Goal: FQSS - float >= -0.15 dB.
{" ".join(reading)}
The FQSS step includes the float teacher's forward pass and the FQSS loss; step times are medians of
{args.step_repeats} interleaved `fit_batch` calls past calibration. Wall time of each run (training, validation,
scoring): {walls}; measured on torch {torch.__version__}."""
    print("\n" + body)
    if not args.no_write:
        write_section("SepFormer (SpeechBrain recipe): float vs vanilla QAT vs FQSS, embedded data", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
