"""``fqss separate``: run an exported ONNX separator on wav files (see :mod:`fqss_plugin.export.cli`)."""
from .cli import add_separate_arguments as add_arguments
from .cli import run_separate as run

__all__ = ["add_arguments", "run"]
