"""Writing a file so that it is either the old one or the whole new one, never half of the new one."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same directory, so the rename is atomic) to write to; it is renamed onto
    ``path`` when the block ends without an error, and removed otherwise. A kill during the write leaves
    ``path`` as it was (and a stray ``.<name>.<pid>.tmp``)::

        with atomic_path("model.onnx") as tmp:
            onnx.save(model, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through :func:`atomic_path`: never a half-written checkpoint."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
