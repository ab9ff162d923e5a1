"""Write one benchmark's section into BENCHMARKS.md (replacing that section only)."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery figure below was written by the script named in its section, with the exact command.\n"


def command_line() -> str:
    """The command that is running now, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(BENCHMARKS.parent):
        script = script.relative_to(BENCHMARKS.parent)
    return "python " + " ".join(shlex.quote(a) for a in [script.as_posix(), *sys.argv[1:]])


def repo_path(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (as a user would type it there)."""
    path = Path(path).resolve()
    return str(path.relative_to(BENCHMARKS.parent)) if path.is_relative_to(BENCHMARKS.parent) else str(path)


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of BENCHMARKS.md with ``body``."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text.rstrip() + "\n")


def publish(title: str, body: str, write: bool = True) -> None:
    """Print a benchmark's section and (unless ``write`` is False, i.e. ``--no-write``) put it in BENCHMARKS.md."""
    print(body)
    if write:
        write_section(title, body)
