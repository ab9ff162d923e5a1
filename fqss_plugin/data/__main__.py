"""``python -m fqss_plugin.data {speech,music} ...``: the same parser as ``fqss make-data``."""
from __future__ import annotations

import argparse
import sys

from fqss_plugin.data.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fqss_plugin.data",
                                     description="generate the embedded datasets (Libri2Mix / MUSDB18-HQ layouts)")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
