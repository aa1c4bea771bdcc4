"""Saves that die half-way lose nothing: the previous checkpoint stays complete and verified, the half
one is never listed, and `resume=latest` still ends where an unbroken run ends. Pruning keeps exactly the
newest complete checkpoints, and a changed byte is caught before a checkpoint is used.

The faults are SIGKILLs patched into the trainer's own process at chosen points of the save (see
cli_runner.py): what `kill -9`, an OOM kill or a power cut at that instant leaves on disk.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from ptune import checkpoint as ck
from reliability_harness import (assert_clean_error, cli, flip_byte, kill_quietly, logged, prefix_of, python_m,
                                 train_args, train_in_background)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, sample_file, tmp_path_factory):
    model = tiny_model_dir("llama")
    base = tmp_path_factory.mktemp("saves")
    ref = train_in_background(model, sample_file, base / "reference")
    yield model, sample_file, ref
    kill_quietly(ref.proc)


def hidden(run) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


FAULTS = [
    pytest.param({"fault": "kill_in_save_file", "file": "prefix.safetensors"}, False, id="before-the-first-file"),
    pytest.param({"fault": "kill_in_save_file", "file": "optimizer.safetensors", "truncate": True}, False,
                 id="half-written-optimizer-file"),
    pytest.param({"fault": "kill_at_fsync", "file": "manifest.json"}, False, id="every-file-written-not-renamed"),
    pytest.param({"fault": "kill_at_fsync", "file": "<run>"}, True, id="renamed-run-folder-not-flushed"),
]


@pytest.mark.parametrize("fault, renamed", FAULTS)
def test_kill_during_a_save_keeps_the_previous_checkpoint(setup, tmp_path, fault, renamed):
    model, data, ref = setup
    out = tmp_path / "run"
    args = train_args(model, data, out)
    died = cli("ptune.train", *args, fault={**fault, "step": 4})
    assert died.rc == -9, str(died)
    expected = [out / "checkpoint-2"] + ([out / "checkpoint-4"] if renamed else [])
    assert ck.list_checkpoints(out) == expected
    assert ck.latest_checkpoint(out) == expected[-1]
    for c in expected:
        ck.verify(c)
    if not renamed:
        # The interrupted save is on disk, hidden, and nothing lists it.
        assert [n for n in hidden(out) if n.startswith(".checkpoint-4.tmp-")], hidden(out)
    assert torch.equal(prefix_of(out / "checkpoint-2"), prefix_of(ref.result() / "checkpoint-2"))
    # the loss plot is redrawn at every checkpoint, so the killed run has one
    assert (out / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    resumed = cli("ptune.train", *args, "resume=latest")
    assert resumed.rc == 0, str(resumed)
    assert f"resumed from {expected[-1]} at step {2 * len(expected)}" in resumed.stderr
    assert [p.name for p in ck.list_checkpoints(out)] == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    assert torch.equal(prefix_of(out / "checkpoint-8"), prefix_of(ref.result() / "checkpoint-8"))
    assert [r["loss"] for r in logged(out)] == [r["loss"] for r in logged(ref.result())]


def test_kill_while_replacing_an_existing_checkpoint(setup, tmp_path):
    """Re-saving step 4 (a resume from checkpoint-2 of a run that already has checkpoint-4) moves the old
    checkpoint-4 aside before moving the new one in; a kill between the two renames leaves both copies
    complete under hidden names. The next run puts the old copy back as checkpoint-4 and resumes there."""
    model, data, ref = setup
    out = tmp_path / "run"
    shutil.copytree(ref.result(), out)
    for step in (6, 8):
        shutil.rmtree(out / f"checkpoint-{step}")
    args = train_args(model, data, out)
    died = cli("ptune.train", *args, f"resume={out / 'checkpoint-2'}", fault={"fault": "kill_between_renames", "step": 4})
    assert died.rc == -9, str(died)
    assert ck.list_checkpoints(out) == [out / "checkpoint-2"]
    old = [out / n for n in hidden(out) if n.startswith(".checkpoint-4.old-")]
    new = [out / n for n in hidden(out) if n.startswith(".checkpoint-4.tmp-")]
    assert len(old) == 1 and len(new) == 1, hidden(out)
    for copy in old + new:  # both complete: nothing of step 4 is lost either
        ck.verify(copy)
        assert torch.equal(prefix_of(copy), prefix_of(ref.result() / "checkpoint-4"))

    resumed = cli("ptune.train", *args, "resume=latest")
    assert resumed.rc == 0, str(resumed)
    assert f"{old[0]} restored as checkpoint-4" in resumed.stderr
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in resumed.stderr
    assert hidden(out) == []
    assert [p.name for p in ck.list_checkpoints(out)] == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    assert torch.equal(prefix_of(out / "checkpoint-8"), prefix_of(ref.result() / "checkpoint-8"))
    assert [r["loss"] for r in logged(out)] == [r["loss"] for r in logged(ref.result())]


def test_keep_last_2_leaves_exactly_the_newest_two_complete_checkpoints(setup, tmp_path):
    model, data, ref = setup
    out = tmp_path / "run"
    res = cli("ptune.train", *train_args(model, data, out, "trainer.keep_last=2"))
    assert res.rc == 0, str(res)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-6", "checkpoint-8"]
    assert ck.list_checkpoints(out) == [out / "checkpoint-6", out / "checkpoint-8"]
    for c in ck.list_checkpoints(out):
        ck.verify(c)
    assert torch.equal(prefix_of(out / "checkpoint-8"), prefix_of(ref.result() / "checkpoint-8"))


def test_a_flipped_byte_in_the_prefix_stops_evaluate_with_one_line(setup, tmp_path):
    """`python -m ptune.evaluate` as a real subprocess refuses a checkpoint whose prefix.safetensors changed;
    the warm runner the other tests use reports exactly the same exit code and message."""
    model, data, ref = setup
    ckpt = shutil.copytree(ref.result() / "checkpoint-8", tmp_path / "checkpoint-8")
    flip_byte(ckpt / "prefix.safetensors")
    args = [f"checkpoint={ckpt}", f"data.eval_file={data}", "device=cpu", "limit=2", f"output_dir={tmp_path / 'eval'}"]
    real, warm = python_m("ptune.evaluate", *args), cli("ptune.evaluate", *args)
    for res in (real, warm):
        assert_clean_error(res, f"error: {ckpt / 'prefix.safetensors'}: SHA-256", "does not match the manifest")
    pick = lambda r: [l for l in r.stderr.splitlines() if l.startswith("error: ")]  # noqa: E731
    assert real.rc == warm.rc == 1 and pick(real) == pick(warm) and len(pick(real)) == 1
    assert not (tmp_path / "eval").exists()  # nothing was generated from the damaged prefix
