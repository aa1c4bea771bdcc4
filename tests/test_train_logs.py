"""What ptune.train's log lines hold: window means, across resumes and saves."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import REPO, logged, run_train, small_run
from ptune.checkpoint import list_checkpoints


def window_mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def test_a_log_line_holds_the_mean_grad_norm_of_its_window_also_across_a_resume(tiny_model_dir, sample_file,
                                                                                 tmp_path):
    """grad_norm, like loss, is the mean over the optimizer steps since the previous log line, not the last
    step's; a checkpoint inside a window (save_steps=3, log_steps=4) carries the partial window to a resume."""
    model = tiny_model_dir("llama")
    every = tmp_path / "every"
    run_train(*small_run(model, sample_file, every))  # a line per step: each step's own grad norm
    per_step = logged(every)
    out = tmp_path / "windowed"
    run_train(*small_run(model, sample_file, out, "trainer.log_steps=4"))
    windowed = logged(out)
    assert [r["step"] for r in windowed] == [4, 6]
    for record, steps in zip(windowed, (per_step[:4], per_step[4:])):
        for key in ("loss", "grad_norm"):
            assert record[key] == pytest.approx(window_mean(steps, key), rel=1e-5, abs=2e-6), (key, record, steps)
    shutil.rmtree(out / "checkpoint-6")
    run_train(*small_run(model, sample_file, out, "trainer.log_steps=4", "resume=latest"))
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in logged(out)] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in windowed]


def test_time_spent_saving_a_checkpoint_is_left_out_of_tokens_per_s(tiny_model_dir, sample_file, tmp_path):
    """Saving is not training: a checkpoint inside a logging window (saved after step 3, logged at step 4) does
    not lower that line's tokens/s. Saving is slowed by PAUSE seconds here; rows are cut to 16 + 16 tokens, so
    the window's two steps hold at most 2 x 4 rows x 64 tokens, and counting the pause would put it below
    512 / PAUSE tokens/s."""
    pause = 4
    slow_save = ("import time\n"
                 "from ptune import checkpoint\n"
                 "save = checkpoint.save_checkpoint\n"
                 f"def slow(*args, **kwargs): time.sleep({pause}); return save(*args, **kwargs)\n"
                 "checkpoint.save_checkpoint = slow\n"
                 "import runpy\n"
                 "runpy.run_module('ptune.train', run_name='__main__', alter_sys=True)\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", slow_save,
                           *small_run(tiny_model_dir("llama"), sample_file, out, "trainer.log_steps=2",
                                      "data.max_source_length=16", "data.max_target_length=16")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    by_step = {r["step"]: r for r in logged(out)}
    assert sorted(by_step) == [2, 4, 6]
    assert by_step[4]["tokens_per_s"] > 2 * 4 * 64 / pause, by_step
