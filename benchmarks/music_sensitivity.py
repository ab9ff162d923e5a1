"""Where 8-bit quantization costs a music model its SDR: post-training sensitivity per quantizer group.

The float package is prepared for QAT (``--mode fqss`` or ``vanilla``, the recipe's conf), its activation
ranges calibrated on ``--calib-steps`` augmented training batches without any weight update, and then the
validation nSDR (the recipe's ``validate``: whole tracks through ``apply_model``) is measured for the float
model, the quantized model, and the quantized model with each quantizer group of
:func:`fqss_plugin.quant.sensitivity.quantizer_groups` run as an identity. A group's gain is the SDR its
8-bit rounding costs after calibration alone (QAT recovers part of it; the groups' gains need not add up).
The same is measured per place (:func:`~fqss_plugin.quant.sensitivity.quantizer_places`: the model's top-level
submodules, and for HTDemucs its two branches), and for every activation quantizer of a ``[B, C, F, T]``
tensor the spread of its input over the frequency rows: each row's RMS and its SQNR under the tensor's single
8-bit step, on one training batch.

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


BRANCHES = {"HTDemucs": {"frequency branch": ("encoder", "decoder", "freq_emb", "freq_emb_add"),
                         "time branch": ("tencoder", "tdecoder")}}


def row_spread(model, batch) -> list[str]:
    """Table rows: per activation quantizer of a 4-D input, its step and its input's per-row RMS and SQNR."""
    from fqss_plugin.quant.quantizers import ActivationQuantizer
    rows, hooks = [], []

    def measure(name):
        def hook(quantizer, inputs, output):
            x = inputs[0]
            if x.dim() != 4:
                return
            rms = x.pow(2).mean(dim=(0, 1, 3)).sqrt()
            sqnr = 20 * torch.log10(rms / (output - x).pow(2).mean(dim=(0, 1, 3)).sqrt().clamp_min(1e-12))
            sqnr = sqnr[rms > 0]
            rows.append(f"| {name} | {tuple(x.shape[1:3])} | {float(quantizer.qparams()[0]):.4f} | "
                        f"{rms.min():.3f} / {rms.median():.3f} / {rms.max():.3f} | "
                        f"{sqnr.min():.1f} / {sqnr.median():.1f} |")
        return hook
    for name, module in model.named_modules():
        if type(module) is ActivationQuantizer:
            hooks.append(module.register_forward_hook(measure(name)))
    model.eval()
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    return rows


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
    from fqss_plugin.quant.sensitivity import bypassed, modules_named, quantizer_groups, quantizer_places

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
            batch = augmentation(sources).sum(dim=1)
            model(batch)
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
    places = quantizer_places(model)
    for branch, members in BRANCHES.get(args.recipe, {}).items():
        places[f"{branch} ({', '.join(m for m in members if m in places)})"] = \
            [name for member in members for name in places.get(member, [])]
    place_rows = []
    for place, names in places.items():
        with bypassed(modules_named(model, names)):
            place_rows.append(f"| {place} | {len(names)} | {validate(model, valid_set) - quantized:+.3f} |")
    spread = row_spread(model, batch)
    body = (f"Command: `{command_line()}`\n\nCPU: {describe_cpu()}\n\n{args.recipe} ({args.mode} quantizers, "
            f"package `{repo_path(args.package)}`), ranges calibrated on {steps} batches, no training; validation "
            f"nSDR over {len(valid_set)} toy tracks: float {float_nsdr:.2f} dB, quantized {quantized:.2f} dB "
            f"({quantized - float_nsdr:+.2f}).\n\n{table}\n\nBy place (every quantizer of the submodule run in float):\n\n"
            "| place | quantizers | nSDR gain when run in float (dB) |\n|---|---|---|\n" + "\n".join(place_rows))
    if spread:
        body += ("\n\nSpread over the frequency rows of each `[B, C, F, T]` activation (its input, one training batch): "
                 "each row's RMS, and its SQNR under the tensor's one 8-bit step.\n\n"
                 "| quantizer | (C, F) | step | row RMS min / median / max | row SQNR min / median (dB) |\n"
                 "|---|---|---|---|---|\n" + "\n".join(spread))
    publish(f"Quantization sensitivity ({args.recipe}, toy MUSDB18-HQ)", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
