"""Prefix checkpoints on disk: written atomically, self-describing, verified when read.

A checkpoint folder `checkpoint-N/` holds
  prefix.safetensors      the prefix encoder's weights (all a user needs to ship)
  prefix_config.json      the prefix spec, the base model it was trained on, the prompt template, the step
  trainer_state.json      step, data position and anything else needed to resume
  optimizer.safetensors   optimizer moments (resume only)
  manifest.json           SHA-256 and size of every file above; written last, so its presence marks a
                          complete checkpoint
It is built in a hidden temporary folder, flushed, and renamed into place, so a crash mid-save leaves
the previous checkpoint untouched and nothing half-written that `latest` or a sweep could pick.
Only safetensors and JSON are written; nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ptune.errors import CheckpointError
from ptune.files import read_json_object, save_tensors, sha256_file

PREFIX_FILE = "prefix.safetensors"
CONFIG_FILE = "prefix_config.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a torch optimizer state dict into named tensors (safetensors) and plain JSON."""
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, prefix_state: dict[str, torch.Tensor], prefix_config: dict,
                    trainer_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write `run_dir/checkpoint-<step>` atomically and return its path.

    A write that fails (a full disk, a read-only folder) raises CheckpointError and leaves the folder as it
    was: the temporary folder goes, since it holds space the next save needs, and a re-saved step's old copy
    is put back."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    old = run_dir / f".checkpoint-{step}.old-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_into(tmp, step, prefix_state, prefix_config, trainer_state, optimizer_state)
        if final.exists():
            # Re-saving a step (e.g. after a resume): move the old one aside first so a crash between the two
            # renames still leaves one complete copy.
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(run_dir)
    except (OSError, SafetensorError) as e:
        if old.exists() and not final.exists():
            old.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"could not write {final}: {reason}; the checkpoints already in {run_dir} are as they "
                              "were") from None
    return final


def _write_into(tmp: Path, step: int, prefix_state, prefix_config, trainer_state, optimizer_state) -> None:
    """A complete checkpoint's files in the new folder `tmp`, flushed, manifest last."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors({k: v.detach().contiguous().cpu() for k, v in prefix_state.items()}, tmp / PREFIX_FILE,
                 metadata={"format": "ptune-prefix"})
    _write_json(tmp / CONFIG_FILE, {**prefix_config, "step": step, "format_version": FORMAT_VERSION})
    if trainer_state is not None:
        state = dict(trainer_state)
        if optimizer_state is not None:
            tensors, meta = optimizer_to_tensors(optimizer_state)
            save_tensors(tensors, tmp / OPTIMIZER_FILE)
            state["optimizer"] = meta
        _write_json(tmp / STATE_FILE, {**state, "step": step})
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    _write_json(tmp / MANIFEST_FILE, {
        name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files
    })
    _fsync(tmp / MANIFEST_FILE)


def missing_files(ckpt: Path) -> list[str]:
    """The files of a complete checkpoint that `ckpt` lacks (the manifest goes last, so a save cut short lacks it)."""
    return [name for name in (MANIFEST_FILE, PREFIX_FILE, CONFIG_FILE) if not (ckpt / name).is_file()]


def is_complete(ckpt: Path) -> bool:
    return not missing_files(ckpt)


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder of a run, complete or not, oldest first (hidden half-saves are not among them)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete `checkpoint-N` folders of a run, oldest first; temporary and partial ones are ignored."""
    return [p for p in checkpoint_folders(run_dir) if is_complete(p)]


def checkpoint_step(ckpt: Path) -> int:
    """N of a `checkpoint-N` folder as list_checkpoints finds them."""
    return int(_NAME.match(ckpt.name).group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def restore_interrupted_resaves(run_dir: str | Path) -> list[tuple[Path, str]]:
    """Finish what a re-save killed between its two renames left behind; returns (folder, what was done).

    Such a kill leaves step N only as `.checkpoint-N.old-PID`, so `latest` would silently go back to an
    earlier step. A copy that verifies against its manifest is renamed back to `checkpoint-N`; one that does
    not is left where it is, for a person to look at. Where `checkpoint-N` is in place and complete (the kill
    came after both renames), the old copy is the leftover the save was about to delete.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    done = []
    for old in sorted(run_dir.iterdir()):
        m = re.match(r"^\.checkpoint-(\d+)\.old-\d+$", old.name)
        if not m or not old.is_dir():
            continue
        final = run_dir / f"checkpoint-{m.group(1)}"
        if final.exists():
            if is_complete(final):
                shutil.rmtree(old, ignore_errors=True)
                done.append((old, f"removed: a leftover copy of {final.name}, which is complete"))
            continue
        try:
            verify(old)
        except CheckpointError as e:
            done.append((old, f"kept: does not verify ({e})"))
            continue
        old.rename(final)
        done.append((old, f"restored as {final.name}: a re-save of that step was interrupted"))
    if done:
        _fsync(run_dir)
    return done


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete half-written `.checkpoint-N.tmp-PID` folders left by a killed save (never read).

    `.old-PID` folders are kept: :func:`restore_interrupted_resaves` decides about them.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.is_dir() and re.match(r"^\.checkpoint-\d+\.tmp-\d+$", p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def prune(run_dir: str | Path, keep_last: int, up_to_step: int | None = None) -> tuple[list[Path], list[str]]:
    """Delete all but the newest `keep_last` complete checkpoints up to `up_to_step` (later ones are a rewound
    run's, left alone); returns what was removed, and why each of the others could not be.

    Each goes out of the checkpoints' names first (renamed to a `.checkpoint-N.tmp-PID` folder, which
    remove_stale_temporaries clears later), so a removal that fails part-way (a file another user or an open NFS
    handle holds) never leaves a half-deleted `checkpoint-N` standing; a training does not stop for it."""
    found = [p for p in list_checkpoints(run_dir) if up_to_step is None or checkpoint_step(p) <= up_to_step]
    doomed = found[:-keep_last] if keep_last > 0 else []
    removed, failed = [], []
    for p in doomed:
        gone = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        try:
            p.rename(gone)
        except OSError as e:
            failed.append(f"{p}: {e.strerror or e}")
            continue
        removed.append(p)
        shutil.rmtree(gone, ignore_errors=True)
        if gone.exists():
            failed.append(f"{p}: out of the checkpoints, but {gone} could not be removed whole")
    return removed, failed


def verify(ckpt: str | Path, files: list[str] | None = None) -> None:
    """Check the listed files (default: all) against the manifest's sizes and SHA-256."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint not found: {ckpt}")
    manifest_path = ckpt / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt} is not a complete ptune checkpoint (no {MANIFEST_FILE}); it may be a save "
                              "that was interrupted")
    manifest = read_manifest(manifest_path)
    for name in files or sorted(manifest):
        entry = manifest.get(name)
        path = ckpt / name
        if entry is None:
            raise CheckpointError(f"{path}: not listed in {manifest_path}")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {manifest_path})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, manifest says {entry['bytes']}; the file is truncated or "
                                  "was changed")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 {actual} does not match the manifest's {entry['sha256']}")


def read_manifest(path: Path) -> dict[str, dict]:
    """A manifest's entries, {file name: {"sha256": hex, "bytes": size}}, refused whole if any is malformed.

    It must list the prefix and its config: a manifest that lists nothing would let every check pass."""
    expected = 'an object of {"<file>": {"sha256": "<hex>", "bytes": <size>}}'
    manifest = read_json_object(path, CheckpointError, "; the checkpoint is damaged", expected)
    for name, entry in manifest.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int) and not isinstance(entry.get("bytes"), bool)):
            raise CheckpointError(f"{path}: entry {name!r} is {json.dumps(entry)}, expected {expected}; the "
                                  "checkpoint is damaged")
    missing = [name for name in (PREFIX_FILE, CONFIG_FILE) if name not in manifest]
    if missing:
        raise CheckpointError(f"{path}: lists no {' or '.join(missing)}; the checkpoint is damaged")
    return manifest


# What every ptune checkpoint's prefix_config.json records, and the readers take without asking.
_RECORDED = {"prefix": ("num_layers", "num_kv_heads", "head_dim", "length"), "base": ("path",), "model": (),
             "data": ("prompt_column", "response_column", "max_source_length", "max_target_length",
                      "truncate_source_from")}


def read_prefix_config(ckpt: str | Path) -> dict:
    path = Path(ckpt) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {ckpt} a ptune checkpoint?")
    config = read_json_object(path, CheckpointError, "; the checkpoint is damaged")
    for section, keys in _RECORDED.items():
        value = config.get(section)
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: no {section!r} object; the checkpoint is damaged")
        missing = [k for k in keys if k not in value]
        if missing:
            raise CheckpointError(f"{path}: {section!r} lacks {', '.join(map(repr, missing))}; the checkpoint is "
                                  "damaged")
    bad = {k: v for k, v in config["prefix"].items() if k in _RECORDED["prefix"] and
           (not isinstance(v, int) or isinstance(v, bool) or v < 1)}
    if bad:
        raise CheckpointError(f"{path}: prefix {json.dumps(bad)}, expected whole numbers above 0; the checkpoint is "
                              "damaged")
    return config


def load_prefix_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    ckpt = Path(ckpt)
    verify(ckpt, [PREFIX_FILE, CONFIG_FILE])
    try:
        return load_file(ckpt / PREFIX_FILE)
    except SafetensorError as e:
        raise CheckpointError(f"{ckpt / PREFIX_FILE}: unreadable safetensors file ({e})") from None


def load_trainer_state(ckpt: str | Path) -> tuple[dict, dict | None]:
    """The resumable state and the optimizer state dict (None if the checkpoint has none)."""
    ckpt = Path(ckpt)
    verify(ckpt)
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} holds no training state ({STATE_FILE}); it can be evaluated but not resumed")
    state = json.loads(path.read_text(encoding="utf-8"))
    meta = state.pop("optimizer", None)
    if meta is None:
        return state, None
    return state, optimizer_from_tensors(load_file(ckpt / OPTIMIZER_FILE), meta)
