"""The ``fqss`` command line: one sub-command per task (``fqss make-data ...``).

Each sub-command lives next to the code it drives and is registered in
:data:`COMMANDS` as ``name -> (module, help)`` or ``name -> (module, help, add_arguments, run)``:
the module provides ``add_arguments(parser)`` and ``run(args) -> int`` (or the two functions named).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, ...]] = {
    "make-data": ("fqss_plugin.data.cli", "generate the embedded datasets (Libri2Mix / MUSDB18-HQ layouts)"),
    "analyze": ("fqss_plugin.analysis", "the SDR bound of b-bit signals, measured SDR and per-group sensitivity, "
                "with plots"),
    "export": ("fqss_plugin.export.cli", "export a trained fqss model package to an int8 ONNX model (onnxruntime)"),
    "separate": ("fqss_plugin.export.cli", "separate wav files with an exported ONNX model (onnxruntime)",
                 "add_separate_arguments", "run_separate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fqss", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text, *functions) in COMMANDS.items():
        module = importlib.import_module(module_name)
        add_arguments, run = functions or ("add_arguments", "run")
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, add_arguments)(sub_parser)
        sub_parser.set_defaults(_run=getattr(module, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
