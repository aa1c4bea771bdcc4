"""Check downloaded model files before loading them.

A hand-downloaded checkpoint with one truncated or corrupted shard loads "fine" and only shows up
later as garbage output, a very slow first inference or an index error.  This module checks the
files of a model folder against a manifest (expected SHA-256 and, where known, size):

* a ``ptune_manifest.json`` placed in the folder (the shape :func:`read_model_manifest` accepts)
  comes first;
* else the published hashes of well-known checkpoints, shipped in ``ptune/chatglm/manifests/*.json``
  and picked by the folder's ``config.json`` (its ``_name_or_path``, else its shape).

Levels, cheapest first:

``size``
    every file exists, has the recorded size where one is known, and is structurally whole (a
    safetensors header that accounts for the whole file, a readable zip directory for ``.bin``).
``first-use`` (the default)
    ``size``, plus the SHA-256 of every file that has an expected hash and has not been verified
    before.  A verified result is remembered in ``.ptune_verified.json`` next to the files (or under
    ``~/.cache/ptune/verified/`` when the folder is read-only), keyed by size and mtime, so later
    loads skip the hashing until a file changes.
``full``
    SHA-256 of every weight file now, whatever is remembered.

``python -m ptune.verify_model <dir> [--full]`` prints the result per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ptune.errors import first_line
from ptune.files import read_json_object, sha256_file, write_text_atomic

__all__ = [
    "IntegrityError", "FileCheck", "LEVELS", "DEFAULT_LEVEL", "OWN_MANIFEST", "VERIFIED_CACHE",
    "sha256_file", "bundled_manifests", "read_model_manifest", "read_weight_map", "find_manifest", "verify_dir",
    "format_table",
]

LEVELS = ("none", "size", "first-use", "full")
DEFAULT_LEVEL = "first-use"
OWN_MANIFEST = "ptune_manifest.json"
VERIFIED_CACHE = ".ptune_verified.json"
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class IntegrityError(ValueError):
    """One or more model files are missing, truncated or do not match their published hash."""

    def __init__(self, message: str, checks: list[FileCheck]):
        super().__init__(message)
        self.checks = checks


@dataclass
class FileCheck:
    name: str
    size: int | None = None
    expected_size: int | None = None
    expected_sha256: str | None = None
    sha256: str | None = None
    status: str = "unchecked"  # ok | size ok | present | MISSING | WRONG SIZE | DAMAGED | HASH MISMATCH
    detail: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status in ("MISSING", "WRONG SIZE", "DAMAGED", "HASH MISMATCH")


def _naturals(value, length: int | None = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _tensor_entry_problem(header) -> str | None:
    """What in a parsed safetensors header no loader could use, or None: every field the data's extent is
    computed from is checked, so a hand-made or damaged header is reported instead of crashing the check."""
    if not isinstance(header, dict):
        return f"the safetensors header is a JSON {type(header).__name__}, expected an object"
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                return f"the safetensors header's __metadata__ is {json.dumps(entry)}; expected an object of strings"
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and _naturals(entry.get("shape"))
              and _naturals(entry.get("data_offsets"), 2) and entry["data_offsets"][0] <= entry["data_offsets"][1])
        if not ok:
            return (f"the safetensors header's entry {name!r} is {json.dumps(entry)}; expected {{\"dtype\": <str>, "
                    "\"shape\": [<int>, ...], \"data_offsets\": [<begin>, <end>]}")
    return None


def _structure_problem(path: Path) -> str | None:
    """A reason the file is visibly incomplete, without reading all of it; None if it looks whole."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if path.suffix == ".safetensors":
        if size < 8:
            return f"the file has {size} bytes, fewer than the 8 that give a safetensors header's length"
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    return f"safetensors header claims {n} bytes, the file has {size}"
                header = json.loads(f.read(n))
        except ValueError as e:  # not JSON, or not UTF-8
            return f"unreadable safetensors header ({e})"
        problem = _tensor_entry_problem(header)
        if problem:
            return problem
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            return f"safetensors data should end at byte {8 + n + end}, the file has {size} (truncated download?)"
        return None
    if path.suffix in (".bin", ".pt", ".pth"):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"PK\x03\x04":
            return None  # legacy (non-zip) torch serialisation: nothing cheap to check
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except Exception as e:  # noqa: BLE001 -- a damaged directory makes zipfile raise almost anything
            return (f"the zip directory at the end of the file is unreadable ({type(e).__name__}: {first_line(e)}; "
                    "truncated or damaged download?)")
    return None


# ----------------------------------------------------------------------------------- manifests


def bundled_manifests() -> list[dict]:
    out = []
    folder = resources.files("ptune.chatglm") / "manifests"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out.append(json.loads(entry.read_text(encoding="utf-8")))
    return out


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}  # matches no bundled manifest; loading reports the config itself


def _manifest_matches(manifest: dict, cfg: dict, present: set[str]) -> bool:
    match = manifest.get("match", {})
    if not any(name in present for name in manifest.get("files", {})):
        return False  # e.g. a re-saved safetensors copy of the same model: the manifest does not apply
    names = [n.lower() for n in match.get("_name_or_path", [])]
    own_name = str(cfg.get("_name_or_path", "")).lower()
    if own_name and own_name in names:
        return True
    if own_name.count("/") == 1 and not os.path.exists(own_name):
        return False  # names another published model
    for key, want in match.get("config", {}).items():
        if cfg.get(key) != want:
            return False
    return bool(match.get("config"))


def _is_file_name(value) -> bool:
    # Model files live in the model folder: "../x" or "/abs/x" would read (and hash) a file elsewhere.
    return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def read_model_manifest(path: str | os.PathLike) -> dict:
    """A manifest file, refused in one IntegrityError unless it has the shape every check relies on:
    {"files": {"<file>": {"sha256": "<hex>", "size": <bytes>}}} (either value may be left out, not both)."""
    path = Path(path)
    expected = '{"files": {"<file>": {"sha256": "<hex>", "size": <bytes>}}}'
    manifest = read_json_object(path, lambda message: IntegrityError(message, []), shape=expected)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise IntegrityError(f"{path}: no \"files\" object listing files; expected {expected}", [])
    for name, spec in files.items():
        sha, size = (spec.get("sha256"), spec.get("size")) if isinstance(spec, dict) else (None, None)
        ok_sha = sha is None or _is_sha256(sha)
        ok_size = size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 0)
        if not _is_file_name(name):
            raise IntegrityError(f"{path}: files[{name!r}] names a file outside the model folder; expected the "
                                 "name of a file in it", [])
        if not (ok_sha and ok_size) or (sha is None and size is None):
            raise IntegrityError(f"{path}: files[{name!r}] is {json.dumps(spec)}; expected {{\"sha256\": <64 hex "
                                 "digits>, \"size\": <bytes>}}", [])
    return manifest


def find_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest for a model folder: its own ``ptune_manifest.json``, else a bundled one whose
    identity matches the folder's config.json."""
    path = Path(path)
    own = path / OWN_MANIFEST
    if own.is_file():
        return read_model_manifest(own)
    cfg = _read_config(path)
    present = {p.name for p in path.iterdir()} if path.is_dir() else set()
    for manifest in bundled_manifests():
        if _manifest_matches(manifest, cfg, present):
            return manifest
    return None


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index (tensor name -> shard file), refused in one IntegrityError naming the
    index and the entry at fault unless every shard is a plain file name beside the index."""
    expected = '{"weight_map": {"<tensor name>": "<shard file name>"}}'
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise IntegrityError(f"{index}: cannot read the shard index ({e.strerror or e})", []) from None
    except ValueError as e:
        raise IntegrityError(f"{index}: not valid JSON ({e}); expected {expected}", []) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise IntegrityError(f"{index}: no \"weight_map\" object; expected {expected}", [])
    for tensor, shard in weight_map.items():
        if not _is_file_name(shard):
            raise IntegrityError(f"{index}: weight_map[{tensor!r}] is {json.dumps(shard)}; expected the name of a "
                                 f"shard file in {index.parent}", [])
    return weight_map


def _listed_files(path: Path) -> list[str]:
    """The weight files present, and the shards of the index the loader reads (the first of INDEX_FILES there,
    as ptune.chatglm.convert.weight_files takes it): a folder may hold both formats' indexes and one format's
    shards, and the other format's are not needed."""
    names = {p.name for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
    index = next((path / name for name in INDEX_FILES if (path / name).is_file()), None)
    if index is not None:
        names |= set(read_weight_map(index).values())
    return sorted(names)


# ----------------------------------------------------------------------------------- verified cache


class _VerifiedCache:
    """SHA-256 results already computed, valid while a file keeps its size and mtime."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.local = folder / VERIFIED_CACHE
        digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
        self.fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptune" / "verified" / f"{digest}.json"
        self.entries: dict = {}
        for candidate in (self.local, self.fallback):
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            files = data.get("files") if isinstance(data, dict) else None
            if isinstance(files, dict):
                # A cache is only a shortcut: an entry of another shape is forgotten, and its file hashed again.
                self.entries = {name: e for name, e in files.items()
                                if isinstance(e, dict) and _is_sha256(e.get("sha256"))}
                break
        self.dirty = False

    def lookup(self, f: Path) -> str | None:
        entry = self.entries.get(f.name)
        if not entry:
            return None
        st = f.stat()
        if entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return entry["sha256"].lower()
        return None

    def remember(self, f: Path, digest: str) -> None:
        st = f.stat()
        self.entries[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
                                "checked": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        text = json.dumps({"note": "SHA-256 results of ptune's integrity check, keyed by size and mtime",
                           "files": self.entries}, indent=2) + "\n"
        for target in (self.local, self.fallback):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(target, text)
                self.dirty = False
                return
            except OSError:
                continue


# ----------------------------------------------------------------------------------- verify


def verify_dir(path: str | os.PathLike, level: str = DEFAULT_LEVEL, manifest: dict | None = None,
               raise_on_error: bool = False) -> list[FileCheck]:
    """Check the files of a model folder; one :class:`FileCheck` per file.

    With ``raise_on_error``, any failure raises :class:`IntegrityError` naming each bad file, what
    was expected, what was found and what to do.
    """
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: expected one of {LEVELS}")
    path = Path(path)
    if level == "none":
        return []
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    manifest = manifest if manifest is not None else find_manifest(path)
    expected = (manifest or {}).get("files", {})
    cache = _VerifiedCache(path)
    checks = []
    for name in sorted(set(_listed_files(path)) | set(expected)):
        f = path / name
        spec = expected.get(name, {})
        c = FileCheck(name, expected_size=spec.get("size"), expected_sha256=(spec.get("sha256") or "").lower() or None)
        checks.append(c)
        if not f.is_file():
            c.status, c.detail = "MISSING", "the file is not in the folder"
            continue
        c.size = f.stat().st_size
        if c.expected_size is not None and c.size != c.expected_size:
            c.status = "WRONG SIZE"
            c.detail = f"expected {c.expected_size} bytes, found {c.size}"
            continue
        problem = _structure_problem(f)
        if problem:
            c.status, c.detail = "DAMAGED", problem
            continue
        cached = cache.lookup(f)
        must_hash = level == "full" or (level == "first-use" and c.expected_sha256 and cached != c.expected_sha256)
        if must_hash:
            c.sha256 = sha256_file(f)
            cache.remember(f, c.sha256)
            c.notes.append("hashed now")
        elif cached:
            c.sha256 = cached
            c.notes.append("hash remembered")
        if c.expected_sha256 and c.sha256:
            if c.sha256 == c.expected_sha256:
                c.status = "ok"
            else:
                c.status = "HASH MISMATCH"
                c.detail = f"SHA-256 expected {c.expected_sha256}, found {c.sha256}"
        elif c.expected_sha256:
            c.status = "size ok" if c.expected_size is not None else "present"
            c.notes.append("not hashed yet (--full)")
        else:
            c.status = "size ok" if c.expected_size is not None else "present"
            if manifest is not None or c.sha256:
                c.notes.append("no published hash" if c.sha256 else "no published hash or size")
    cache.save()
    if raise_on_error:
        bad = [c for c in checks if c.failed]
        if bad:
            raise IntegrityError(_error_message(path, bad, manifest), checks)
    return checks


def _error_message(path: Path, bad: list[FileCheck], manifest: dict | None) -> str:
    fix = (manifest or {}).get("how_to_fix", "download this file again")
    lines = [f"{len(bad)} file(s) in {path} failed the integrity check:"]
    for c in bad:
        lines.append(f"  {c.name}: {c.status}: {c.detail}")
    lines.append(f"What to do: {fix} -- only the file(s) named above; the others are fine. Then run "
                 f"`python -m ptune.verify_model {path} --full` to confirm.")
    if manifest is not None and "match" in manifest:  # a bundled manifest, picked by the folder's identity
        lines.append(f"(Expected values are the published ones for {manifest.get('name')}. If you deliberately use "
                     "other weights, give them a name of your own in the folder's config.json, \"_name_or_path\": "
                     f"\"<you>/<model>\", so that they are not taken for {manifest.get('name')}.)")
    return "\n".join(lines)


def format_table(checks: list[FileCheck]) -> str:
    rows = [("file", "size", "expected size", "sha256", "status", "notes")]
    for c in checks:
        rows.append((
            c.name,
            "-" if c.size is None else str(c.size),
            "-" if c.expected_size is None else str(c.expected_size),
            (c.sha256 or "-")[:16],
            c.status,
            "; ".join(c.notes),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    for c in checks:
        if c.failed:
            out.append(f"{c.name}: {c.detail}")
    return "\n".join(out)
