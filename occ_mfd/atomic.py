"""Atomic file writes: write a temp file in the target's folder, then ``os.replace`` it into place.

A crash or kill at any moment leaves either the old file or the new one, never a partial one (rename is
atomic within one filesystem, hence the same folder). Temp names are ``<name>.<random>.tmp<suffix>`` so a
verifier can find leftovers with the glob ``*.tmp*``; the temp file is removed on any error.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def _file_mode() -> int:
    """0o666 minus the process umask, like ``open()`` would give (mkstemp alone gives 0o600, which
    would make prepared datasets unreadable to other users on a shared cluster)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a writer that wants a file name (torch.save, imageio, …);
    on success the temp file is renamed to ``path``, on any error it is removed. ``suffix`` is appended
    to the temp name for writers that pick a format from the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True,
                 suffix: str = "") -> Path:
    """Call ``write(f)`` on a temp file next to ``path``, then rename it to ``path``; returns ``path``."""
    with atomic_path(path, suffix) as tmp, open(tmp, "wb" if binary else "w") as f:
        write(f)
    return Path(path)
