"""The output directory: writability check, no silent overwrite, size accounting."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fqss_plugin.data.errors import DataGenerationError


def prepare_output_dir(out: Path, generated: tuple[str, ...], overwrite: bool) -> None:
    """Create ``out``; refuse (or, with ``overwrite``, delete) the entries ``generated`` that already exist there.

    Only the names a generator writes are ever deleted, never the rest of ``out``.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as error:
        raise DataGenerationError(f"--out {out} is not a writable directory: {error.strerror or error}") from None
    existing = [name for name in generated if (out / name).exists()]
    if existing and not overwrite:
        raise DataGenerationError(f"--out {out} already holds {', '.join(existing)}; choose another directory "
                                  "or pass --overwrite to regenerate them")
    for name in existing:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
