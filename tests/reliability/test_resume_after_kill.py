"""Nothing lost when a run dies: SIGKILL at a random moment, then `resume=latest`, ends bitwise where an
unbroken run ends; SIGTERM and SIGINT save a checkpoint at the step they stop after.

The kill moment is drawn with a seeded random.Random (a step after the first checkpoint, then a delay
inside that step), so a failure names a reproducible moment. Prefix dropout is on, so a resume that drew
different random numbers, or fed different rows, could not match bit for bit.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest
import torch

from ptune import checkpoint as ck
from reliability_harness import (LONG, cli, cli_start, kill_quietly, last_logged_step, logged, popen_m, prefix_of,
                                 train_args, train_in_background, wait_for, write_long_rows)

# PTUNE_KILL_SEED=<n> replays (or varies) the kill moments.
KILL_SEED = int(os.environ.get("PTUNE_KILL_SEED", "2024"))


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """(model, data, reference run): the reference is the unbroken run, started in the background."""
    model = tiny_model_dir("llama")
    base = tmp_path_factory.mktemp("kill")
    data = write_long_rows(base / "long.jsonl")
    ref = train_in_background(model, data, base / "reference", *LONG)
    yield model, data, ref
    kill_quietly(ref.proc)


def assert_same_history(run, reference) -> None:
    """Every step logged once, in order, with the unbroken run's loss, learning rate and gradient norm."""
    got, want = logged(run), logged(reference)
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in want], key


def test_sigkill_at_a_random_step_then_resume_latest_is_bitwise_exact(setup, tmp_path):
    model, data, ref = setup
    rng = random.Random(KILL_SEED)
    out = tmp_path / "run"
    args = train_args(model, data, out, *LONG)
    proc = popen_m("ptune.train", *args)
    try:
        wait_for(lambda: ck.latest_checkpoint(out) is not None, proc, "the first checkpoint")
        target = rng.randint(2, 6)  # kill inside step target+1 (or the save after it)
        wait_for(lambda: last_logged_step(out) >= target, proc, f"step {target}")
        time.sleep(rng.uniform(0.0, 0.06))
    finally:
        kill_quietly(proc)
    killed = proc.wait(30)
    assert killed.rc == -signal.SIGKILL, f"the run ended before the kill (kill after step {target})\n{killed}"
    print(f"killed after step {target} (+ up to 60 ms); latest complete checkpoint: {ck.latest_checkpoint(out)}")
    survivor = ck.latest_checkpoint(out)
    at = int(survivor.name.split("-")[1])
    assert 2 <= at < 8, survivor
    ck.verify(survivor)
    # Whatever the kill interrupted (a step, a save), only complete checkpoints are listed.
    assert all(ck.is_complete(p) for p in ck.list_checkpoints(out))

    resumed = cli("ptune.train", *args, "resume=latest")
    assert resumed.rc == 0, str(resumed)
    assert f"resumed from {survivor} at step {at}" in resumed.stderr
    assert f"step {at + 1} loss" in resumed.stderr and f"step {at} loss" not in resumed.stderr  # no step redone
    reference = ref.result()
    assert torch.equal(prefix_of(out / "checkpoint-8"), prefix_of(reference / "checkpoint-8"))
    assert_same_history(out, reference)
    state = ck.load_trainer_state(out / "checkpoint-8")[0]
    assert state["step"] == 8 and state["global_batch"] == 4 and state["seed"] == 42


@pytest.mark.parametrize("sig, real", [
    pytest.param(signal.SIGTERM, False, id="SIGTERM"),
    pytest.param(signal.SIGINT, False, id="SIGINT"),
    pytest.param(signal.SIGTERM, True, id="SIGTERM-real-subprocess", marks=pytest.mark.slow),
])
def test_sigterm_and_sigint_save_the_step_they_stop_after(setup, tmp_path, sig, real):
    """The run is a warm forked child running the same entry point (see cli_runner.py), or with `real` a
    `python -m ptune.train` subprocess."""
    model, data, ref = setup
    rng = random.Random(KILL_SEED + sig)
    out = tmp_path / "run"
    # A checkpoint every 4 steps, so the step the signal stops at is (almost always) saved only because
    # of the signal; saving has no effect on the numbers, so the unbroken reference still applies.
    args = train_args(model, data, out, *LONG, "trainer.save_steps=4")
    start = popen_m if real else cli_start
    proc = start("ptune.train", *args)
    try:
        # the loss plot is redrawn right after each save: once it is there, save 4 is over
        wait_for(lambda: (out / "checkpoint-4").is_dir() and (out / "train_loss.png").is_file(), proc,
                 "checkpoint-4 and its loss plot")
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(sig)
        stopped = proc.wait(120)
    finally:
        kill_quietly(proc)
    assert stopped.rc == 128 + sig, str(stopped)  # saved, but not finished: `set -e` scripts stop there
    found = re.search(rf"stopped by signal {int(sig)} after step (\d+); resume with resume=latest", stopped.stderr)
    assert found, str(stopped)
    at = int(found.group(1))
    assert 4 < at < 8, f"the signal did not land mid-run (stopped after step {at})"
    assert ck.latest_checkpoint(out) == out / f"checkpoint-{at}"
    ck.verify(out / f"checkpoint-{at}")
    assert [r["step"] for r in logged(out)] == list(range(1, at + 1))

    resumed = cli("ptune.train", *args, "resume=latest")
    assert resumed.rc == 0, str(resumed)
    assert f"at step {at}" in resumed.stderr
    reference = ref.result()
    assert torch.equal(prefix_of(out / "checkpoint-8"), prefix_of(reference / "checkpoint-8"))
    assert_same_history(out, reference)
