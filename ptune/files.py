"""Files written whole (a reader, or a crash part-way, never sees half of one), tensors written readable like any
other file, SHA-256 of files, JSON objects read with the file at fault named, and folders one process at a time."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
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


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once, at import, before any thread
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_umask()


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, leaving the file as readable as any other new file: save_file makes it owner-only,
    and a shared run folder's prefix would be unreadable to the colleague who evaluates or resumes it."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, NEW_FILE_MODE)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (model shards are several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str | os.PathLike, error: Callable[[str], Exception], hint: str = "",
                     shape: str = "an object") -> dict:
    """The JSON object in `path`, or `error` naming the file and what is wrong with it: unreadable, not JSON, or
    JSON of another kind than `shape` says (`hint`, what a bad file means for the caller, appended to each but a
    permission fault, which says nothing about the file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise error(f"{path}: not valid JSON ({e}), expected {shape}{hint}") from None
    except PermissionError as e:
        raise error(f"{path}: unreadable ({e.strerror or e}); give this user read access to it and its folders") from None
    except OSError as e:
        raise error(f"{path}: unreadable ({e.strerror or e}){hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: a JSON {type(data).__name__}, expected {shape}{hint}")
    return data


class FolderInUse(Exception):
    """Another process holds the folder (:func:`held_folder`)."""


def _lock(folder: Path) -> int | None:
    """A descriptor of `folder` holding an exclusive flock on it (the kernel's: no file left behind, and a process
    that dies lets go of it); FolderInUse at once where another holds it. None where no lock can be had: not a
    POSIX system, a folder that can be written but not read. A filesystem without flock (some network mounts)
    gives a descriptor without the lock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(str(folder)) from None
    except OSError:
        pass
    return fd


@contextmanager
def held_folder(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` for the block (:func:`_lock`); the block runs unlocked where none can be had."""
    fd = _lock(folder)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


_held_by_this_process: dict[Path, int | None] = {}


def hold_for_this_process(folder: Path) -> None:
    """An exclusive lock on `folder` until this process ends (:func:`_lock`). Asked again in the same process, it
    is held already."""
    key = Path(folder).resolve()
    if key not in _held_by_this_process:
        _held_by_this_process[key] = _lock(key)
