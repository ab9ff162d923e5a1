"""Where 8-bit quantization costs a music model its SDR: post-training sensitivity per quantizer group.

The float package is prepared for QAT (``--mode fqss`` or ``vanilla``, the recipe's conf), its activation
ranges calibrated on ``--calib-steps`` augmented training batches without any weight update, and then the
validation nSDR (the recipe's ``validate``: whole tracks through ``apply_model``) is measured for the float
model, the quantized model, and the quantized model with each quantizer group of
:func:`fqss_plugin.quant.sensitivity.quantizer_groups` run as an identity. A group's gain is the SDR its
8-bit rounding costs after calibration alone (QAT recovers part of it; the groups' gains need not add up).

    python benchmarks/music_sensitivity.py --recipe HTDemucs \\
        --package recipes/MUSDB18/HTDemucs/pretrained/embedded_float/best.th
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import command_line, publish, repo_path  # noqa: E402
from fqss_plugin.export.cpu import describe_cpu  # noqa: E402


def recipe_module(recipe: str):
    """``recipes/MUSDB18/<recipe>/train.py`` as a module (its ``build_models``)."""
    path = REPO / "recipes" / "MUSDB18" / recipe / "train.py"
    spec = importlib.util.spec_from_file_location(f"music_recipe_{recipe}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="HTDemucs", help="a folder of recipes/MUSDB18")
    parser.add_argument("--package", type=Path, required=True, help="the float package to quantize")
    parser.add_argument("--mode", default="fqss", choices=("fqss", "vanilla"))
    parser.add_argument("--musdb", type=Path, default=REPO / "data" / "musdb18hq")
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    if not args.package.is_file():
        parser.error(f"--package {args.package}: no such file")

    from fqss_plugin.demucs.recipe import load_conf, make_augment, make_datasets, validate
    from fqss_plugin.quant.calibration import calibration_step
    from fqss_plugin.quant.sensitivity import bypassed, modules_named, quantizer_groups

    recipe_dir = REPO / "recipes" / "MUSDB18" / args.recipe
    conf = load_conf([str(recipe_dir / "conf" / f"{args.mode}.yaml"), f"dset.musdb={args.musdb.resolve()}",
                      f"dset.metadata={recipe_dir / 'metadata'}", f"quant.calib_steps={args.calib_steps}",
                      f"pretrained={args.package.resolve()}"])
    torch.manual_seed(conf.seed)
    model, teacher, _ = recipe_module(args.recipe).build_models(conf)
    train_set, valid_set = make_datasets(conf)
    augmentation = make_augment(conf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=conf.optim.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(conf.seed))
    model.train()
    with torch.no_grad():
        for steps, sources in enumerate(loader, 1):
            model(augmentation(sources).sum(dim=1))
            if calibration_step(model) == 0:
                break
    float_nsdr, quantized = validate(teacher, valid_set), validate(model, valid_set)
    rows = []
    for group, names in quantizer_groups(model).items():
        with bypassed(modules_named(model, names)):
            rows.append((group, len(names), validate(model, valid_set) - quantized))
    rows.sort(key=lambda row: -row[2])
    table = "| quantizer group | quantizers | nSDR gain when run in float (dB) |\n|---|---|---|\n" + "\n".join(
        f"| {group} | {count} | {gain:+.3f} |" for group, count, gain in rows)
    body = (f"Command: `{command_line()}`\n\nCPU: {describe_cpu()}\n\n{args.recipe} ({args.mode} quantizers, "
            f"package `{repo_path(args.package)}`), ranges calibrated on {steps} batches, no training; validation "
            f"nSDR over {len(valid_set)} toy tracks: float {float_nsdr:.2f} dB, quantized {quantized:.2f} dB "
            f"({quantized - float_nsdr:+.2f}).\n\n{table}")
    publish(f"Quantization sensitivity ({args.recipe}, toy MUSDB18-HQ)", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
