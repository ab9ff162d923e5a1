"""External command-line tools: presence checks with install instructions, and calls.

The generators shell out to Debian packages (``espeak-ng``, ``flite``);
``make install`` installs them through apt when run as root (see the Makefile's
``APT_TOOLS``).  :func:`require_tools` fails early, before any work is done.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from fqss_plugin.data.errors import DataGenerationError, MissingToolError

APT_PACKAGE = {"espeak-ng": "espeak-ng", "flite": "flite"}


def require_tools(*names: str) -> None:
    """Raise :class:`MissingToolError` naming every tool in ``names`` that is not on ``PATH``."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        packages = " ".join(APT_PACKAGE.get(name, name) for name in missing)
        raise MissingToolError(
            f"missing tool(s): {', '.join(missing)}. Install them with "
            f"`sudo apt-get install {packages}` (or run `make install` as root)."
        )


def run_tool(command: list[str], env: dict[str, str] | None = None) -> bytes:
    """Run ``command`` and return its stdout; raise :class:`DataGenerationError` with its stderr on failure."""
    full_env = None if env is None else {**os.environ, **env}
    result = subprocess.run(command, capture_output=True, env=full_env, check=False)
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode(errors="replace").strip() or f"exit status {result.returncode}"
        raise DataGenerationError(f"{command[0]} failed ({' '.join(command[:4])} ...): {message}")
    return result.stdout
