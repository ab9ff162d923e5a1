"""The ``fqss`` command line: one sub-command per task (``fqss make-data ...``).

Each sub-command lives next to the code it drives and is registered in
:data:`COMMANDS` as ``name -> (module, help)``; the module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "make-data": ("fqss_plugin.data.cli", "generate the embedded datasets (Libri2Mix / MUSDB18-HQ layouts)"),
    "export": ("fqss_plugin.export.cli", "export a trained fqss model package to an int8 ONNX model (onnxruntime)"),
    "separate": ("fqss_plugin.export.cli_separate", "separate wav files with an exported ONNX model (onnxruntime)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fqss", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
