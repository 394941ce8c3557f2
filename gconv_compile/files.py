"""The one way gconv-compile writes a file: atomically, with the mode the umask gives.

A write goes to a temporary file in the destination folder and is renamed over the destination,
so a reader sees the old file or the new one, never half of one, and a failed write leaves
nothing behind. ``tempfile.mkstemp`` creates files with mode 0600; the result is given the mode
an ordinary ``open(path, "w")`` would (0666 minus the umask), because reports, sources and
drawings are for sharing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_PREFIX = ".gconv-tmp-"


def umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON (non-JSON values through ``str``) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
