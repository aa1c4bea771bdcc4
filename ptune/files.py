"""Files written whole (a reader, or a crash part-way, never sees half of one) and their SHA-256."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends without an error it replaces `path` in
    one rename. A writer stopped part-way leaves the old file (or none), and an error removes the temporary file.

    The writer creates the file itself, so it gets the usual permissions (a mkstemp file would stay owner-only).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8, newlines as given) in one rename."""
    with replacing(path) as tmp:
        with open(tmp, "x", encoding="utf-8", newline="") as f:
            f.write(text)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (model shards are several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
