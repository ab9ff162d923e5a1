"""Bad inputs and faults against fqss's commands and recipes: how many give one clear error, and what else.

    python benchmarks/robustness_sweep.py              # prints the table and the counts, writes BENCHMARKS.md

Each case runs a real command line in a subprocess (``fqss separate``, ``fqss export``, ``fqss analyze``,
``fqss make-data``, the recipes' ``train.py``) on tiny files made here, and is classified:

* **clear error** -- non-zero exit, no Python traceback, and the message names the file or parameter
  the case is about;
* **correct** -- the command succeeds and its output checks out (files written and finite, nothing
  clobbered);
* **traceback**, **vague error** (no traceback, but the message does not name the culprit),
  **silently wrong** (exit 0 but the check fails) -- the three failures.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.report import command_line, publish  # noqa: E402

PYTHON = sys.executable
FQSS = [PYTHON, "-m", "fqss_plugin.cli"]


@dataclass
class Case:
    area: str
    name: str
    command: list[str]
    expect: str                                   # "error" or "ok"
    names: str = ""                               # what a clear error must mention
    check: Callable[[], bool] | None = None       # for "ok" (and to check nothing was lost on "error")
    cwd: Path | None = None


def run_case(case: Case) -> tuple[str, str]:
    run = subprocess.run(case.command, capture_output=True, text=True, cwd=case.cwd, timeout=600,
                         env={**__import__("os").environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    text = run.stdout + run.stderr
    intact = case.check() if case.check else True
    if case.expect == "ok":
        outcome = "correct" if run.returncode == 0 and intact else \
            "silently wrong" if run.returncode == 0 else ("traceback" if "Traceback" in text else "vague error")
    elif run.returncode == 0:
        outcome = "silently wrong"
    elif "Traceback (most recent call last)" in run.stderr:
        outcome = "traceback"
    else:
        outcome = "clear error" if case.names.lower() in text.lower() and intact else "vague error"
    last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), "")
    return outcome, last[:140]


def make_fixtures(root: Path) -> dict:
    """A tiny trained-enough quantized ConvTasNet (package + int8 ONNX), wavs, a tiny Libri2Mix."""
    import fqss_plugin as fq
    from asteroid.models import ConvTasNet

    from fqss_plugin.asteroid import prepare_model, save_quantized_model
    from fqss_plugin.asteroid.package import with_plain_versions
    from fqss_plugin.data.speech import SpeechConfig, generate_speech
    from fqss_plugin.export import to_onnx

    torch.manual_seed(0)
    float_model = ConvTasNet(n_src=2, n_filters=16, kernel_size=16, stride=8, n_blocks=2, n_repeats=1, bn_chan=16,
                             hid_chan=16, skip_chan=16, sample_rate=8000).eval()
    torch.save(with_plain_versions(float_model.serialize()), root / "float.pth")
    model = prepare_model(copy.deepcopy(float_model), fq.QuantConfig.fqss(calib_steps=1))
    with torch.no_grad():
        model.train()(torch.randn(2, 8000) * 0.1)
    fq.calibration_step(model)
    save_quantized_model(model, root / "fqss.pth")
    nan_model = copy.deepcopy(model)
    with torch.no_grad():
        nan_model.masker.bottleneck[1].weight.fill_(float("nan"))
    save_quantized_model(nan_model, root / "nan.pth")
    to_onnx(model, root / "model.onnx")
    import onnx
    bare = onnx.load(str(root / "model.onnx"))
    del bare.metadata_props[:]                                   # an ONNX file from another exporter
    onnx.save(bare, str(root / "bare.onnx"))
    (root / "truncated.onnx").write_bytes((root / "model.onnx").read_bytes()[:4096])
    (root / "corrupt.th").write_bytes(b"not a model package")
    generate_speech(SpeechConfig(out=root / "speech", hours=0.003, train_speakers=4, eval_speakers=3, eval_mixtures=2,
                                 jobs=1, progress=False, cross_engine=False, mix_types=("mix_clean",)))
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    for name, data, rate in (("good.wav", wav, 8000), ("stereo.wav", np.stack([wav, wav], 1), 8000),
                             ("rate.wav", wav, 16000), ("empty.wav", wav[:0], 8000), ("five.wav", wav[:5], 8000)):
        sf.write(root / name, data, rate)
    bad = wav.copy()
    bad[100:110] = np.nan
    sf.write(root / "nan.wav", bad, 8000, subtype="FLOAT")
    (root / "noise.wav").write_bytes(b"RIFF not really a wav")
    (root / "clash").mkdir()
    sf.write(root / "clash" / "a.wav", wav, 8000)
    sf.write(root / "clash" / "a_s1.wav", wav, 8000)
    for folder in ("x", "y"):
        (root / folder).mkdir()
        sf.write(root / folder / "same.wav", wav, 8000)
    (root / "sbpkg").mkdir()
    (root / "sbpkg" / "hyperparams.yaml").write_text(f"pwn: !apply:os.system ['touch {root / 'pwned'}']\n")
    (root / "state.pth").write_bytes(b"")
    torch.save({"weight": torch.zeros(3)}, root / "state.pth")
    (root / "afile").write_text("an earlier result")
    return {"root": root}


def cases(root: Path) -> list[Case]:
    out = root / "out"
    model = str(root / "model.onnx")
    sep = FQSS + ["separate", "--model", model]
    exp = FQSS + ["export"]
    csv_test = root / "speech" / "data" / "wav8k" / "min" / "test" / "mixture_test_mix_clean.csv"
    data_dir = root / "speech" / "data"
    recipe = REPO / "recipes" / "LibriMix" / "ConvTasNet"
    htdemucs = REPO / "recipes" / "MUSDB18" / "HTDemucs"
    train = [PYTHON, "train.py"]
    good_a = (root / "clash" / "a_s1.wav").read_bytes()

    def wrote(path: Path) -> Callable[[], bool]:
        return lambda: path.is_file() and np.isfinite(sf.read(path)[0]).all()

    sepformer = REPO / "recipes" / "LibriMix" / "SepFormer"
    sepformer_run = train + ["hparams/sepformer-embedded-float.yaml", "--device", "cpu", "--noprogressbar"]
    finished = out / "finished"                      # a SepFormer run that wrote its results
    (finished / "pretrained").mkdir(parents=True, exist_ok=True)
    (finished / "test_results.csv").write_text("snt,si-snr\navg,12.0\n")
    typo_conf = root / "typo.yml"
    typo_conf.write_text((recipe / "conf" / "float.yml").read_text().replace("  epochs:", "  ephocs:"))
    return [
        Case("separate", "a good mixture", sep + ["--out-dir", str(out / "good"), str(root / "good.wav")], "ok",
             check=wrote(out / "good" / "good_s2.wav")),
        Case("separate", "an input that is also an output", sep + ["--out-dir", str(root / "clash"),
             str(root / "clash" / "a.wav"), str(root / "clash" / "a_s1.wav")], "error", "a_s1.wav",
             check=lambda: (root / "clash" / "a_s1.wav").read_bytes() == good_a),
        Case("separate", "two inputs with one stem", sep + ["--out-dir", str(out / "same"), str(root / "x" / "same.wav"),
             str(root / "y" / "same.wav")], "error", "same_s1.wav"),
        Case("separate", "existing outputs", sep + ["--out-dir", str(out / "good"), str(root / "good.wav")], "error",
             "--overwrite"),
        Case("separate", "NaN samples", sep + ["--out-dir", str(out / "n"), str(root / "nan.wav")], "error", "nan.wav"),
        Case("separate", "an empty file", sep + ["--out-dir", str(out / "e"), str(root / "empty.wav")], "error",
             "empty.wav"),
        Case("separate", "5 samples", sep + ["--out-dir", str(out / "f"), str(root / "five.wav")], "error", "five.wav"),
        Case("separate", "stereo", sep + ["--out-dir", str(out / "s"), str(root / "stereo.wav")], "error", "stereo.wav"),
        Case("separate", "another sample rate", sep + ["--out-dir", str(out / "r"), str(root / "rate.wav")], "error",
             "16000"),
        Case("separate", "not audio", sep + ["--out-dir", str(out / "a"), str(root / "noise.wav")], "error",
             "noise.wav"),
        Case("separate", "a missing model", FQSS + ["separate", "--model", str(root / "none.onnx"), "--out-dir",
             str(out / "m"), str(root / "good.wav")], "error", "none.onnx"),
        Case("separate", "an ONNX file without fqss metadata", FQSS + ["separate", "--model", str(root / "bare.onnx"),
             "--out-dir", str(out / "b"), str(root / "rate.wav")], "error", "--sample-rate",
             check=lambda: not (out / "b").exists() or not any((out / "b").iterdir())),
        Case("separate", "a truncated ONNX file", FQSS + ["separate", "--model", str(root / "truncated.onnx"),
             "--out-dir", str(out / "t"), str(root / "good.wav")], "error", "truncated.onnx"),
        Case("separate", "--out-dir is a file", sep + ["--out-dir", str(root / "afile"), str(root / "good.wav")],
             "error", "afile", check=lambda: (root / "afile").read_text() == "an earlier result"),
        Case("export", "a good package", exp + ["--checkpoint", str(root / "fqss.pth"), "--out",
             str(out / "m.onnx")], "ok", check=lambda: (out / "m.onnx").is_file()),
        Case("export", "--out is the checkpoint", exp + ["--checkpoint", str(root / "fqss.pth"), "--out",
             str(root / "fqss.pth")], "error", "checkpoint", check=lambda: (root / "fqss.pth").stat().st_size > 10000),
        Case("export", "--out exists", exp + ["--checkpoint", str(root / "fqss.pth"), "--out", str(root / "afile")],
             "error", "--overwrite", check=lambda: (root / "afile").read_text() == "an earlier result"),
        Case("export", "--out is a folder", exp + ["--checkpoint", str(root / "fqss.pth"), "--out", str(root / "x")],
             "error", "directory"),
        Case("export", "an untrusted SpeechBrain package", exp + ["--checkpoint", str(root / "sbpkg"), "--out",
             str(out / "sb.onnx")], "error", "--trust-package", check=lambda: not (root / "pwned").exists()),
        Case("export", "NaN weights", exp + ["--checkpoint", str(root / "nan.pth"), "--out", str(out / "nan.onnx")],
             "error", "nan", check=lambda: not (out / "nan.onnx").exists()),
        Case("export", "a float package", exp + ["--checkpoint", str(root / "float.pth"), "--out",
             str(out / "f.onnx")], "error", "float.pth"),
        Case("export", "a missing checkpoint", exp + ["--checkpoint", str(root / "none.pth"), "--out",
             str(out / "n.onnx")], "error", "none.pth"),
        Case("export", "a state dict, not a package", exp + ["--checkpoint", str(root / "state.pth"), "--out",
             str(out / "s.onnx")], "error", "state.pth"),
        Case("analyze", "a missing mixtures CSV", FQSS + ["analyze", "--checkpoint", str(root / "fqss.pth"),
             "--mixtures", str(root / "none.csv"), "--out", str(out / "an")], "error", "none.csv"),
        Case("analyze", "a good run", FQSS + ["analyze", "--checkpoint", str(root / "fqss.pth"), "--mixtures",
             str(csv_test), "--out", str(out / "an2"), "--no-sensitivity"], "ok",
             check=lambda: (out / "an2" / "sdr_vs_bits.png").is_file()),
        Case("make-data", "negative hours", FQSS + ["make-data", "speech", "--out", str(out / "d"), "--hours", "-1"],
             "error", "hours"),
        Case("make-data", "real speech from a missing folder", FQSS + ["make-data", "speech", "--out",
             str(out / "d2"), "--real-speech", str(root / "nowhere")], "error", "nowhere"),
        Case("make-data", "a folder holding other files", FQSS + ["make-data", "speech", "--out", str(root / "x"),
             "--hours", "0.003", "--quiet"], "ok", check=lambda: (root / "x" / "same.wav").is_file()
             and (root / "x" / "Libri2Mix").is_dir()),
        Case("Asteroid recipe", "a conf typo", train + ["--conf", str(typo_conf), "--exp_dir", str(out / "t")],
             "error", "ephocs", cwd=recipe),
        Case("Asteroid recipe", "a missing conf", train + ["--conf", str(root / "none.yml")], "error", "none.yml",
             cwd=recipe),
        Case("Asteroid recipe", "--exp_dir is a file", train + ["--conf", "conf/float.yml", "--exp_dir",
             str(root / "afile"), "--data_dir", str(data_dir)], "error", "afile", cwd=recipe,
             check=lambda: (root / "afile").read_text() == "an earlier result"),
        Case("Asteroid recipe", "a missing --data_dir", train + ["--conf", "conf/float.yml", "--exp_dir",
             str(out / "md"), "--data_dir", str(root / "nowhere")], "error", "nowhere", cwd=recipe),
        Case("Asteroid recipe", "QAT without --pretrained", train + ["--conf", "conf/fqss.yml", "--exp_dir",
             str(out / "np"), "--data_dir", str(data_dir)], "error", "--pretrained", cwd=recipe),
        Case("HTDemucs recipe", "an override typo", train + ["conf/float.yaml", "optim.ephocs=3"], "error", "ephocs",
             cwd=htdemucs),
        Case("HTDemucs recipe", "a missing MUSDB18-HQ", train + ["conf/float.yaml", f"dset.musdb={root / 'nowhere'}",
             f"exp_dir={out / 'h'}"], "error", "dset.musdb", cwd=htdemucs),
        Case("HTDemucs recipe", "QAT without pretrained", train + ["conf/fqss.yaml", f"dset.musdb={root}",
             f"exp_dir={out / 'h2'}"], "error", "pretrained", cwd=htdemucs),
        Case("HTDemucs recipe", "a corrupt pretrained package", train + ["conf/fqss.yaml", f"dset.musdb={root}",
             f"pretrained={root / 'corrupt.th'}", f"exp_dir={out / 'h3'}"], "error", "corrupt.th", cwd=htdemucs),
        Case("HTDemucs recipe", "a negative segment", train + ["conf/float.yaml", "dset.segment=-1",
             f"exp_dir={out / 'h4'}"], "error", "dset.segment", cwd=htdemucs),
        Case("HTDemucs recipe", "a batch the remix cannot group", train + ["conf/float.yaml", "optim.batch_size=6",
             f"exp_dir={out / 'h5'}"], "error", "group_size", cwd=htdemucs),
        Case("HTDemucs recipe", "an unknown calibration method", train + ["conf/fqss.yaml", "quant.calib_method=minmax",
             f"pretrained={root / 'corrupt.th'}", f"exp_dir={out / 'h6'}"], "error", "calib_method", cwd=htdemucs),
        Case("SepFormer recipe", "a missing --data_folder", sepformer_run + ["--data_folder", str(root / "nowhere"),
             "--output_folder", str(out / "sf1")], "error", "nowhere", cwd=sepformer),
        Case("SepFormer recipe", "--debug into a finished run", sepformer_run + ["--data_folder",
             str(root / "speech" / "Libri2Mix"), "--output_folder", str(finished), "--debug"], "error", "--debug",
             cwd=sepformer, check=lambda: (finished / "test_results.csv").read_text() == "snt,si-snr\navg,12.0\n"),
        Case("SepFormer recipe", "QAT under fp16", train + ["hparams/sepformer-embedded-fqss.yaml", "--device", "cpu",
             "--data_folder", str(root / "speech" / "Libri2Mix"), "--output_folder", str(out / "sf3"), "--precision",
             "fp16"], "error", "precision", cwd=sepformer),
        Case("SepFormer recipe", "a missing hparams file", train + [str(root / "none.yaml")], "error", "none.yaml",
             cwd=sepformer),
        Case("music ConvTasNet recipe", "a corrupt pretrained package", train + ["conf/fqss.yaml",
             f"pretrained={root / 'corrupt.th'}", f"exp_dir={out / 'c1'}"], "error", "corrupt.th",
             cwd=REPO / "recipes" / "MUSDB18" / "ConvTasNet"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fqss_sweep_"))
    try:
        make_fixtures(root)
        results = [(case, *run_case(case)) for case in cases(root)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    counts = {kind: sum(outcome == kind for _, outcome, _ in results)
              for kind in ("clear error", "correct", "vague error", "traceback", "silently wrong")}
    lines = ["| area | case | expected | outcome | last line |", "|---|---|---|---|---|"]
    lines += [f"| {case.area} | {case.name} | {case.expect} | {outcome} | "
              f"`{last.replace(str(root), '<tmp>').replace('|', '/')}` |" for case, outcome, last in results]
    from fqss_plugin.export.cpu import describe_cpu
    body = (f"`{command_line()}` ({describe_cpu()}; the outcomes do not depend on the CPU)\n\n"
            f"{len(results)} cases: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ".\n\n"
            + "\n".join(lines))
    publish("Robustness sweep (bad inputs and faults)", body, not args.no_write)
    return 0 if counts["clear error"] + counts["correct"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
