"""Atomic file writes: after a crash the target holds the old content or the new, never half of either.

    with atomic_write("out/model.safetensors") as tmp:
        save_file(arrays, tmp)            # write the temporary path however you like

The temporary file sits beside the target (same file system, so the rename is atomic); on leaving the block it
is fsync'd, renamed over the target, and the folder is fsync'd so the rename itself survives a power cut. On
an exception it is removed and the target is untouched.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: str | os.PathLike, mode: int = 0o644) -> Iterator[str]:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)   # mkstemp makes 0600 files; a saved model is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames in ``folder`` durable (POSIX); a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
