"""ptune.train under torchrun: ranks that train as one process, and that stop together (2 gloo processes on the CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, logged, run_train, small_run, two_rank_launcher
from ptune.checkpoint import list_checkpoints


def test_torchrun_two_gloo_processes_match_one_process(tiny_model_dir, sample_file, tmp_path):
    model = tiny_model_dir("glm")
    # Same micro-batches (2 rows; 1 rank x 4 vs 2 ranks x 2) and dropout left on: its masks are seeded per
    # micro-batch, so both runs draw the same ones. Both on the CPU even where a GPU is present: two
    # processes on one GPU are not what this compares.
    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    common = ["prefix.dropout=0.1", "trainer.max_steps=5", "trainer.save_steps=5", "trainer.sort_by_length=true"]
    one = tmp_path / "one"
    run_train(*small_run(model, sample_file, one, *common, "trainer.gradient_accumulation_steps=4"), env=cpu)
    two = tmp_path / "two"
    launcher = [*two_rank_launcher(), "-m"]
    run_train(*small_run(model, sample_file, two, *common), launcher=launcher, env=cpu)
    a = load_file(one / "checkpoint-5" / "prefix.safetensors")["embedding.weight"]
    b = load_file(two / "checkpoint-5" / "prefix.safetensors")["embedding.weight"]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert not torch.equal(a, load_file(one / "checkpoint-5" / "prefix.safetensors")["embedding.weight"] * 0)
    assert [p.name for p in list_checkpoints(two)] == ["checkpoint-5"]
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint-5", "config.yaml", "train.log", "train_log.jsonl",
                                                       "train_loss.png"]
    assert [r["step"] for r in logged(two)] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in logged(two)] == pytest.approx([r["loss"] for r in logged(one)], abs=1e-5)


def two_gloo_ranks(*overrides: str) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m ptune.train ...` on the CPU (gloo), not waited for."""
    return subprocess.Popen([*two_rank_launcher(), "-m", "ptune.train", *overrides], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            start_new_session=True)  # its own process group: see stop_all


def stop_all(proc: subprocess.Popen) -> None:
    """Kills torchrun and its workers: killing torchrun alone would leave a hung worker running."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_a_run_file_rank_0_cannot_write_stops_every_rank(tiny_model_dir, sample_file, tmp_path):
    """Rank 0 alone writes the run folder; where that fails, the other ranks stop with it instead of waiting in
    their next collective until the process group's timeout (half an hour)."""
    out = tmp_path / "run"
    (out / "train_log.jsonl").mkdir(parents=True)  # stands in for a file that cannot be written (root ignores modes)
    proc = two_gloo_ranks(*small_run(tiny_model_dir("llama"), sample_file, out))
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        stop_all(proc)
    assert proc.returncode != 0
    assert f"error: could not write {out / 'train_log.jsonl'}" in err, err[-3000:]
    assert "error: rank 0 stopped writing the run folder (its error is above); stopping with it" in err, err[-3000:]
    # torchrun's closing summary names each rank's error line, not a pointer to a traceback. (Which rank it calls
    # the root cause is its choice: the earliest failure, to the second.)
    summary = err.rsplit("ptune.train FAILED\n", 1)[-1]
    assert "To enable traceback" not in summary, summary
    assert f"traceback : error: could not write {out / 'train_log.jsonl'}" in summary, summary
    assert "traceback : error: rank 0 stopped writing the run folder" in summary, summary


def worker_pids(agent: int) -> list[int]:
    children = set()
    for task in os.listdir(f"/proc/{agent}/task"):
        children.update(int(c) for c in open(f"/proc/{agent}/task/{task}/children").read().split())
    return sorted(children)


def test_a_setting_hydra_refuses_under_torchrun_is_its_one_line_in_torchruns_summary(tmp_path):
    """Refused while the config is composed, before any rank imports torch's distributed code or meets another."""
    proc = two_gloo_ranks("trainer.max_steps=abc", f"output_dir={tmp_path / 'run'}")
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        stop_all(proc)
    assert proc.returncode != 0
    summary = err.rsplit("ptune.train FAILED\n", 1)[-1]
    assert "To enable traceback" not in summary, err[-3000:]
    assert "traceback : error: trainer.max_steps='abc': expected a whole number" in summary, err[-3000:]
    assert not (tmp_path / "run").exists()


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tiny_model_dir, sample_file, tmp_path):
    """Signals reach the ranks at slightly different moments; they still stop after one and the same step (a
    rank that went on alone would wait forever, or pair its collectives with the wrong ones)."""
    out = tmp_path / "run"
    proc = two_gloo_ranks(*small_run(tiny_model_dir("llama"), sample_file, out, "trainer.max_steps=500",
                                     "trainer.save_steps=500"))
    try:
        deadline = time.monotonic() + 120
        while not ((out / "train_log.jsonl").is_file() and len(logged(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGTERM)  # the later-started worker; torchrun itself is not told
        _, err = proc.communicate(timeout=120)
    finally:
        stop_all(proc)
    stopped = [line for line in err.splitlines() if "stopped by signal 15 after step" in line]
    assert stopped, err[-3000:]
    at = int(stopped[0].split("after step ")[1].split(";")[0])
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{at}"] and at < 500
    assert [r["step"] for r in logged(out)][-1] == at


def test_a_bug_under_torchrun_puts_its_traceback_in_torchruns_summary(tmp_path, monkeypatch):
    """A user's mistake reaches the summary as its one line (above); an unexpected exception, a bug, as its
    traceback, read back here by torchrun's own failure summary."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from ptune.errors import exit_on_user_error

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    @exit_on_user_error
    def main():
        return {}["no such key"]

    with pytest.raises(KeyError):
        main()
    failure = ProcessFailure(local_rank=1, pid=1234, exitcode=1, error_file=str(error_file))
    summary = ChildFailedError("ptune.train", {1: failure}).format_msg()
    assert "To enable traceback" not in summary, summary
    assert "Traceback (most recent call last)" in summary and "KeyError: 'no such key'" in summary, summary
    assert 'return {}["no such key"]' in summary, summary
