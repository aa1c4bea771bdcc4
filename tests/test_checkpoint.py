"""ptune.checkpoint: atomic, self-describing, verified prefix checkpoints."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ptune import checkpoint as ck
from ptune.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    PREFIX_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_prefix_weights,
    load_trainer_state,
    prune,
    read_prefix_config,
    save_checkpoint,
    verify,
)

# The sections ptune.train records (read_prefix_config refuses a file without them), plus free-form extras.
CONFIG = {"prefix": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "length": 8, "projection": False},
          "base": {"path": "tiny/llama"}, "model": {"template": "chatglm2"},
          "data": {"prompt_column": "content", "response_column": "summary", "history_column": None,
                   "max_source_length": 64, "max_target_length": 128, "truncate_source_from": "right"},
          "nested": {"layers": [0, 1]}, "note": "前缀"}


def prefix_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embedding.weight": torch.randn(8, 16, generator=g),
        "trans.0.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "trans.2.weight": torch.randn(16, 4, generator=g)[:, :2],  # non-contiguous view
    }


def train_adamw(steps, params=None):
    """A real AdamW over two parameters in two groups, stepped `steps` times on fixed data."""
    if params is None:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": 3e-2, "weight_decay": 0.0}],
                            lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    for _ in range(steps):
        step_once(opt, params)
    return params, opt


def step_once(opt, params):
    opt.zero_grad()
    loss = (params[0] ** 3).sum() + (params[1] * torch.arange(4.0)).pow(2).sum()
    loss.backward()
    opt.step()


def full_save(run, step, seed=0, **kw):
    _, opt = train_adamw(1)
    return save_checkpoint(run, step, prefix_state(seed), CONFIG, trainer_state={"epoch": 1, "data_pos": step * 8},
                           optimizer_state=opt.state_dict(), **kw)


# ------------------------------------------------------------------------------------------------- round trip


def test_save_load_round_trip(tmp_path):
    state = prefix_state()
    ckpt = save_checkpoint(tmp_path / "run", 12, state, CONFIG)
    assert ckpt == tmp_path / "run" / "checkpoint-12" and ckpt.is_dir()
    loaded = load_prefix_weights(ckpt)
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(ckpt / PREFIX_FILE), framework="pt") as f:
        assert f.metadata() == {"format": "ptune-prefix"}


def test_prefix_config(tmp_path):
    ckpt = save_checkpoint(tmp_path, 7, prefix_state(), {**CONFIG, "step": 999})
    cfg = read_prefix_config(ckpt)
    assert cfg["step"] == 7
    assert cfg["format_version"] == ck.FORMAT_VERSION
    for k, v in CONFIG.items():
        assert cfg[k] == v
    with pytest.raises(CheckpointError, match="missing"):
        read_prefix_config(tmp_path / "nowhere")


def test_manifest_lists_every_file(tmp_path):
    ckpt = full_save(tmp_path, 3)
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text(encoding="utf-8"))
    on_disk = {p.name for p in ckpt.iterdir()}
    assert on_disk == {PREFIX_FILE, CONFIG_FILE, STATE_FILE, OPTIMIZER_FILE, MANIFEST_FILE}
    assert set(manifest) == on_disk - {MANIFEST_FILE}
    for name, entry in manifest.items():
        data = (ckpt / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data) > 0
    verify(ckpt)


def test_prefix_only_checkpoint_has_no_state_files(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, prefix_state(), CONFIG)
    assert {p.name for p in ckpt.iterdir()} == {PREFIX_FILE, CONFIG_FILE, MANIFEST_FILE}
    with pytest.raises(CheckpointError, match="no training state"):
        load_trainer_state(ckpt)


def test_trainer_state_without_optimizer(tmp_path):
    ckpt = save_checkpoint(tmp_path, 4, prefix_state(), CONFIG, trainer_state={"epoch": 2, "rng": [1, 2]})
    state, opt = load_trainer_state(ckpt)
    assert opt is None
    assert state == {"epoch": 2, "rng": [1, 2], "step": 4}
    assert not (ckpt / OPTIMIZER_FILE).exists()


def test_optimizer_state_resumes_bitwise(tmp_path):
    params, opt = train_adamw(2)
    ckpt = save_checkpoint(tmp_path, 2, prefix_state(), CONFIG, trainer_state={"epoch": 0, "data_pos": 16},
                           optimizer_state=opt.state_dict())
    state, opt_state = load_trainer_state(ckpt)
    assert state == {"epoch": 0, "data_pos": 16, "step": 2}
    assert opt_state is not None

    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _, opt2 = train_adamw(0, fresh)
    opt2.load_state_dict(opt_state)
    for a, b in zip(params, fresh):
        sa, sb = opt.state[a], opt2.state[b]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert [g["lr"] for g in opt2.param_groups] == [1e-2, 3e-2]
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.1, 0.0]

    step_once(opt, params)
    step_once(opt2, fresh)
    for a, b in zip(params, fresh):
        assert torch.equal(a, b)
    # And the check has teeth: an optimizer that starts over diverges.
    restarted = [torch.nn.Parameter(p.detach().clone()) for p in train_adamw(2)[0]]
    _, opt3 = train_adamw(0, restarted)
    step_once(opt3, restarted)
    assert not torch.equal(restarted[0], params[0])


# ------------------------------------------------------------------------------------- listing, latest, prune


def test_list_and_latest_ignore_temporary_and_partial(tmp_path):
    run = tmp_path / "run"
    assert list_checkpoints(run) == [] and latest_checkpoint(run) is None
    for step in (2, 8, 9):
        full_save(run, step)
    tmp = run / ".checkpoint-7.tmp-123"
    shutil.copytree(run / "checkpoint-8", tmp)  # complete-looking contents, temporary name
    (run / "checkpoint-9" / MANIFEST_FILE).unlink()  # interrupted before the manifest
    no_prefix = run / "checkpoint-20"
    shutil.copytree(run / "checkpoint-8", no_prefix)
    (no_prefix / PREFIX_FILE).unlink()
    (run / "checkpoint-30").write_text("not a folder")
    shutil.copytree(run / "checkpoint-8", run / "checkpoint-x")
    shutil.copytree(run / "checkpoint-8", run / "checkpoint-40.old-1")
    assert list_checkpoints(run) == [run / "checkpoint-2", run / "checkpoint-8"]
    assert latest_checkpoint(run) == run / "checkpoint-8"
    assert latest_checkpoint(str(run)) == run / "checkpoint-8"


def test_latest_is_numeric_not_lexicographic(tmp_path):
    for step in (9, 10, 2, 100):
        save_checkpoint(tmp_path, step, prefix_state(step), CONFIG)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10",
                                                            "checkpoint-100"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-100"
    shutil.rmtree(tmp_path / "checkpoint-100")
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"


def test_prune_keeps_newest_and_never_touches_temporary(tmp_path):
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, prefix_state(step), CONFIG)
    tmp = tmp_path / ".checkpoint-11.tmp-99"
    shutil.copytree(tmp_path / "checkpoint-1", tmp)
    partial = tmp_path / "checkpoint-0"
    shutil.copytree(tmp_path / "checkpoint-1", partial)
    (partial / MANIFEST_FILE).unlink()
    before = {p.name: p.read_bytes() for p in tmp.iterdir()}

    removed, failed = prune(tmp_path, keep_last=2)
    assert failed == []
    assert removed == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".checkpoint-11.tmp-99", "checkpoint-0", "checkpoint-3", "checkpoint-10"])
    assert {p.name: p.read_bytes() for p in tmp.iterdir()} == before
    assert torch.equal(load_prefix_weights(tmp_path / "checkpoint-10")["embedding.weight"],
                       prefix_state(10)["embedding.weight"])
    # Nothing more to remove.
    assert prune(tmp_path, keep_last=2) == ([], [])
    assert prune(tmp_path, keep_last=5) == ([], [])
    assert len(list_checkpoints(tmp_path)) == 2


# ----------------------------------------------------------------------------------------------------- verify


def test_verify_detects_flipped_byte(tmp_path):
    ckpt = full_save(tmp_path, 5)
    path = ckpt / PREFIX_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data, header still valid
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"prefix\.safetensors: SHA-256 [0-9a-f]{64} does not match"):
        verify(ckpt)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_prefix_weights(ckpt)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_trainer_state(ckpt)


def test_verify_detects_truncation(tmp_path):
    ckpt = full_save(tmp_path, 5)
    path = ckpt / PREFIX_FILE
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as e:
        verify(ckpt)
    msg = str(e.value)
    assert str(path) in msg and f"{size - 10} bytes" in msg and f"manifest says {size}" in msg
    assert "truncated" in msg


def test_verify_detects_missing_file(tmp_path):
    ckpt = full_save(tmp_path, 5)
    (ckpt / OPTIMIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: missing"):
        verify(ckpt)
    with pytest.raises(CheckpointError, match="missing"):
        load_trainer_state(ckpt)
    # The prefix alone is still usable: loading weights checks only what it reads.
    verify(ckpt, [PREFIX_FILE, CONFIG_FILE])
    assert set(load_prefix_weights(ckpt)) == set(prefix_state())


def test_verify_subset_ignores_other_damage(tmp_path):
    ckpt = full_save(tmp_path, 5)
    (ckpt / STATE_FILE).write_text("{}", encoding="utf-8")
    verify(ckpt, [PREFIX_FILE])
    with pytest.raises(CheckpointError, match=r"trainer_state\.json"):
        verify(ckpt)
    with pytest.raises(CheckpointError, match="not listed"):
        verify(ckpt, ["extra.bin"])


def test_verify_without_manifest_says_incomplete(tmp_path):
    ckpt = full_save(tmp_path, 5)
    (ckpt / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a complete ptune checkpoint.*interrupted"):
        verify(ckpt)
    with pytest.raises(CheckpointError, match="interrupted"):
        load_prefix_weights(ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        verify(tmp_path / "checkpoint-404")


def test_verify_damaged_manifest_raises_checkpoint_error(tmp_path):
    ckpt = full_save(tmp_path, 5)
    path = ckpt / MANIFEST_FILE
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError):
        verify(ckpt)


def _rewrite(ckpt: Path, name: str, content: str) -> None:
    """Replace one file and list it in the manifest as it now is, so that only its shape is wrong."""
    (ckpt / name).write_text(content, encoding="utf-8")
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest[name] = {"sha256": hashlib.sha256(content.encode()).hexdigest(), "bytes": len(content.encode())}
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("manifest, fault", [
    ("[]", "a JSON list, expected an object of"),
    ("{}", "lists no prefix.safetensors or prefix_config.json"),
    ('{"prefix.safetensors": {"sha256": "00"}}', "entry 'prefix.safetensors' is {\"sha256\": \"00\"}"),
    ('{"prefix.safetensors": {"sha256": "00", "bytes": "12"}}', "entry 'prefix.safetensors' is"),
    ('{"prefix.safetensors": "00"}', "entry 'prefix.safetensors' is \"00\""),
])
def test_a_manifest_of_another_shape_is_refused_and_never_passes_for_listing_nothing(tmp_path, manifest, fault):
    ckpt = full_save(tmp_path, 5)
    (ckpt / MANIFEST_FILE).write_text(manifest)
    for read in (verify, load_prefix_weights, load_trainer_state):
        with pytest.raises(CheckpointError, match=re.escape(f"{ckpt / MANIFEST_FILE}: ")) as e:
            read(ckpt)
        assert fault in str(e.value) and "the checkpoint is damaged" in str(e.value)


@pytest.mark.parametrize("content, fault", [
    ("[]", "a JSON list, expected an object"),
    ("{}", "no 'prefix' object"),
    (json.dumps({**CONFIG, "data": {k: v for k, v in CONFIG["data"].items() if k != "max_target_length"}}),
     "'data' lacks 'max_target_length'"),
    (json.dumps({**CONFIG, "prefix": {**CONFIG["prefix"], "length": "8"}}),
     'prefix {"length": "8"}, expected whole numbers above 0'),
    (json.dumps({**CONFIG, "base": "tiny/llama"}), "no 'base' object"),
])
def test_a_prefix_config_of_another_shape_is_refused_naming_what_it_lacks(tmp_path, content, fault):
    ckpt = full_save(tmp_path, 5)
    _rewrite(ckpt, CONFIG_FILE, content)
    verify(ckpt)  # the manifest matches: only the shape is wrong
    with pytest.raises(CheckpointError) as e:
        read_prefix_config(ckpt)
    assert str(e.value).startswith(f"{ckpt / CONFIG_FILE}: ") and fault in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------- atomic re-save


def test_resave_same_step_replaces_atomically(tmp_path):
    first = full_save(tmp_path, 5, seed=1)
    assert (first / STATE_FILE).exists()
    second = save_checkpoint(tmp_path, 5, prefix_state(2), {**CONFIG, "pre_seq_len": 4})
    assert second == first
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]  # no .tmp / .old folders left
    assert {p.name for p in second.iterdir()} == {PREFIX_FILE, CONFIG_FILE, MANIFEST_FILE}  # old files gone
    loaded = load_prefix_weights(second)
    for k, v in prefix_state(2).items():
        assert torch.equal(loaded[k], v)
    assert not torch.equal(loaded["embedding.weight"], prefix_state(1)["embedding.weight"])
    assert read_prefix_config(second)["pre_seq_len"] == 4
    verify(second)


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    full_save(tmp_path, 5, seed=1)
    real = ck.save_tensors

    def crash_on_optimizer(tensors, path, *a, **kw):
        if Path(path).name == OPTIMIZER_FILE:
            raise OSError("disk full")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(ck, "save_tensors", crash_on_optimizer)
    for step in (5, 6):
        with pytest.raises(CheckpointError, match="disk full"):
            full_save(tmp_path, step, seed=2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-5"]
    verify(tmp_path / "checkpoint-5")
    assert torch.equal(load_prefix_weights(tmp_path / "checkpoint-5")["embedding.weight"],
                       prefix_state(1)["embedding.weight"])
    # A later save of the same step starts from a clean temporary folder and succeeds.
    full_save(tmp_path, 6, seed=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    verify(tmp_path / "checkpoint-6")


@pytest.mark.parametrize("failing", [OPTIMIZER_FILE, MANIFEST_FILE, "rename"])
@pytest.mark.parametrize("step", [5, 6], ids=["re-save", "new-step"])
def test_a_full_disk_during_a_save_is_one_checkpoint_error_and_leaves_nothing_behind(tmp_path, monkeypatch,
                                                                                     failing, step):
    """A full disk (or a read-only folder) mid-save: a CheckpointError (one line for the user, not a traceback)
    naming the checkpoint and the reason; the half-written temporary folder is removed (it held the space the
    next save needs) and checkpoint-5, re-saved or not, is still the complete one it was."""
    import errno

    from safetensors import SafetensorError

    full_save(tmp_path, 5, seed=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-5").iterdir()}
    real_save, real_write, real_rename = ck.save_tensors, ck._write_json, Path.rename

    def save_file(tensors, path, *a, **kw):
        if Path(path).name == failing:  # what safetensors raises for ENOSPC
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path, *a, **kw)

    def write_json(path, obj):
        if path.name == failing:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, obj)

    def rename(self, target):  # the first rename into place only: putting an old copy back must work
        if failing == "rename" and Path(target).name == f"checkpoint-{step}" and not failed:
            failed.append(target)
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_rename(self, target)

    failed = []

    monkeypatch.setattr(ck, "save_tensors", save_file)
    monkeypatch.setattr(ck, "_write_json", write_json)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(CheckpointError, match=rf"could not write {tmp_path / f'checkpoint-{step}'}: .*"
                       r"(No space left on device|Read-only file system)") as e:
        full_save(tmp_path, step, seed=2)
    monkeypatch.undo()
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    verify(tmp_path / "checkpoint-5")
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-5").iterdir()} == before


# ----------------------------------------------------------------------------------------------- file formats


def test_everything_written_is_safetensors_or_json(tmp_path):
    full_save(tmp_path, 1)
    full_save(tmp_path, 1)  # re-save path too
    save_checkpoint(tmp_path, 2, prefix_state(), CONFIG)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 8
    for p in files:
        assert p.suffix in {".json", ".safetensors"}, p
        if p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
        else:
            with safe_open(str(p), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
            assert not p.read_bytes().startswith(b"PK")  # not a torch.save zip


def test_remove_stale_temporaries_keeps_complete_and_old_copies(tmp_path):
    from ptune.checkpoint import remove_stale_temporaries

    good = save_checkpoint(tmp_path, 3, {"embedding.weight": torch.ones(2, 2)}, {"prefix": {}})
    tmp = tmp_path / ".checkpoint-5.tmp-4242"
    old = tmp_path / ".checkpoint-3.old-4242"
    for folder in (tmp, old):
        folder.mkdir()
        (folder / "prefix.safetensors").write_bytes(b"partial")
    removed = remove_stale_temporaries(tmp_path)
    assert removed == [tmp] and not tmp.exists()
    assert old.exists() and good.exists()


def test_restore_interrupted_resaves_puts_a_verified_copy_back_and_keeps_a_damaged_one(tmp_path):
    from ptune.checkpoint import latest_checkpoint, restore_interrupted_resaves, verify

    save_checkpoint(tmp_path, 2, {"embedding.weight": torch.zeros(2, 2)}, {"prefix": {}})
    four = save_checkpoint(tmp_path, 4, {"embedding.weight": torch.full((2, 2), 4.0)}, {"prefix": {}})
    six = save_checkpoint(tmp_path, 6, {"embedding.weight": torch.full((2, 2), 6.0)}, {"prefix": {}})
    eight = save_checkpoint(tmp_path, 8, {"embedding.weight": torch.full((2, 2), 8.0)}, {"prefix": {}})
    # a re-save of 4 killed between its renames; one of 6 whose old copy was damaged since; one of 8 killed
    # after both renames, before the old copy was deleted
    four.rename(tmp_path / ".checkpoint-4.old-11")
    six.rename(tmp_path / ".checkpoint-6.old-12")
    with open(tmp_path / ".checkpoint-6.old-12" / "prefix.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    shutil.copytree(eight, tmp_path / ".checkpoint-8.old-13")
    shutil.rmtree(eight)
    save_checkpoint(tmp_path, 8, {"embedding.weight": torch.full((2, 2), 8.5)}, {"prefix": {}})
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-8"

    done = dict(restore_interrupted_resaves(tmp_path))

    assert done[tmp_path / ".checkpoint-4.old-11"].startswith("restored as checkpoint-4")
    assert done[tmp_path / ".checkpoint-6.old-12"].startswith("kept: does not verify")
    assert "SHA-256" in done[tmp_path / ".checkpoint-6.old-12"]
    assert done[tmp_path / ".checkpoint-8.old-13"].startswith("removed")
    verify(tmp_path / "checkpoint-4")
    assert torch.equal(load_prefix_weights(tmp_path / "checkpoint-4")["embedding.weight"], torch.full((2, 2), 4.0))
    assert (tmp_path / ".checkpoint-6.old-12").is_dir() and not (tmp_path / "checkpoint-6").exists()
    assert not (tmp_path / ".checkpoint-8.old-13").exists()
    assert torch.equal(load_prefix_weights(tmp_path / "checkpoint-8")["embedding.weight"], torch.full((2, 2), 8.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-6.old-12", "checkpoint-2", "checkpoint-4",
                                                          "checkpoint-8"]
    again = restore_interrupted_resaves(tmp_path)  # idempotent: only the damaged copy is reported again
    assert [folder for folder, _ in again] == [tmp_path / ".checkpoint-6.old-12"]
