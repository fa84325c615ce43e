"""Write a file so that a kill at any moment leaves the previous version whole.

The new content goes beside the target under a fixed hidden name (``.last.ckpt.fw-tmp``), is
flushed and fsynced, and is renamed over the target (atomic on one filesystem); then the
folder is fsynced so the rename itself survives a crash. The hidden file a kill may leave is
the one the next save of that target writes and renames. Imports torch only, so a writer
process starts fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.fw-tmp")


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(file)`` the new content of ``path`` so that a kill leaves the old one whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_atomically(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through :func:`write_atomically`."""
    write_atomically(path, lambda f: torch.save(checkpoint, f))
