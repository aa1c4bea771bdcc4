"""Guarded training: a non-finite loss or gradient stops the run, naming the step and what to try, and
leaves the last good checkpoint as it was; under fp16 an overflowing step is skipped and counted instead.

The non-finite values are provoked, not injected into the trainer: a resume with an absurd learning rate
(optim.lr=1e30, no clipping) blows the prefix up; a base model folder with a NaN in one weight is broken
from step 0; a base whose output layer is scaled x100 overflows fp16 gradients at GradScaler's initial
loss scale (2^16), so the first step(s) overflow and the scale comes down.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptune import checkpoint as ck
from reliability_harness import assert_clean_error, cli, logged, prefix_of, snapshot, train_args

TRAINING_ERROR_TRACEBACK = (
    "`python -m ptune.train` runs train.py as __main__, so the TrainingError it raises is __main__.TrainingError, "
    "while ptune.errors.USER_ERRORS catches ptune.train.TrainingError (a second import of the module): Hydra "
    "prints the traceback. Fix: define TrainingError in ptune/errors.py and import it in ptune/train.py.")


def edited_model(src, dst, edit):
    """A copy of a model folder whose safetensors weights went through `edit(state_dict)`."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------ fp32: stop with a message


@pytest.fixture(scope="module")
def blown_up(tiny_model_dir, sample_file, tmp_path_factory):
    """A good run to checkpoint-4, then `resume=latest` with optim.lr=1e30 and clipping off."""
    model = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("blowup") / "run"
    good = cli("ptune.train", *train_args(model, sample_file, out, "trainer.max_steps=4"))
    assert good.rc == 0, str(good)
    assert "Warning" not in good.stderr, str(good)  # the multirun callback is quiet in a single run
    before = snapshot(out / "checkpoint-4")
    res = cli("ptune.train", *train_args(model, sample_file, out, "resume=latest", "optim.lr=1e30",
                                         "optim.max_grad_norm=null"))
    return out, before, res


def test_a_blown_up_prefix_stops_the_run_naming_the_step(blown_up):
    out, before, res = blown_up
    assert res.rc == 1, str(res)
    # Step 5 applies the absurd update (finite, ~1e30); step 6's gradient is NaN and stops the run.
    line = next((l for l in res.stderr.splitlines() if "non-finite" in l), None)
    assert line is not None, str(res)
    assert "step 6: non-finite gradient norm" in line
    assert f"the last checkpoint in {out} is intact" in line
    assert "Try a lower optim.lr (now 1e+30), optim.max_grad_norm=1.0" in line  # clipping was off here
    assert "float16" not in line  # a float32 base: no dtype advice
    assert ck.list_checkpoints(out) == [out / "checkpoint-2", out / "checkpoint-4"]
    assert snapshot(out / "checkpoint-4") == before
    ck.verify(out / "checkpoint-4")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-saved step either
    assert [r["step"] for r in logged(out)] == [1, 2, 3, 4, 5]


def test_a_blown_up_prefix_stops_without_a_traceback(blown_up):
    out, before, res = blown_up
    assert_clean_error(res, "error: step 6: non-finite gradient norm")


def test_a_nan_in_the_base_weights_stops_at_step_1_and_writes_no_checkpoint(tiny_model_dir, sample_file, tmp_path):
    def poison(sd):
        sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")

    model = edited_model(tiny_model_dir("llama"), tmp_path / "nan-model", poison)
    out = tmp_path / "run"
    res = cli("ptune.train", *train_args(model, sample_file, out))
    assert res.rc == 1, str(res)
    assert (f"error: step 1: non-finite loss (loss=nan, grad_norm=nan) before any update, so not from the learning "
            f"rate: the base model gives it on this data. Check its weights (python -m ptune.verify_model {model} "
            "--full)\n") in res.stderr, str(res)
    assert not [p for p in out.iterdir() if "checkpoint" in p.name]
    assert logged(out) == []


def test_a_multirun_job_that_fails_does_not_cancel_the_jobs_after_it(tiny_model_dir, sample_file, tmp_path):
    """One job's failure (here a base with a NaN weight) used to end the whole multirun at once; the jobs after it
    now run, and the multirun still ends with status 1 and a list of what failed."""
    def poison(sd):
        sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")

    good = tiny_model_dir("llama")
    bad = edited_model(good, tmp_path / "nan-model", poison)
    sweep = tmp_path / "multirun"
    shared = [a for a in train_args(good, sample_file, sweep, "trainer.max_steps=2")
              if not a.startswith(("model.path=", "output_dir="))]
    res = cli("ptune.train", "-m", f"model.path={bad},{good}", f"hydra.sweep.dir={sweep}", *shared)
    assert res.rc == 1, str(res)
    assert not ck.list_checkpoints(sweep / "0") and ck.list_checkpoints(sweep / "1") == [sweep / "1" / "checkpoint-2"]
    assert "Traceback" not in res.stderr, str(res)
    job, summary = res.stderr.split("error: 1 of 2 multirun jobs failed:")
    assert "error: step 1: non-finite loss (loss=nan, grad_norm=nan) before any update" in job, str(res)
    assert "saved " + str(sweep / "1" / "checkpoint-2") in job, str(res)  # the next job ran, after the failure
    assert summary.splitlines()[1].startswith(f"  #0 (model.path={bad}): step 1: non-finite loss"), summary


# ------------------------------------------------------------------------------ fp16: skip and count


def cpu_fp16_works() -> bool:
    try:
        a = torch.ones(4, 4, dtype=torch.float16, requires_grad=True)
        (a @ a).sum().backward()
        return a.grad is not None and a.grad.dtype == torch.float16
    except RuntimeError:
        return False


@pytest.fixture(scope="module")
def fp16_runs(tiny_model_dir, sample_file, tmp_path_factory):
    if not cpu_fp16_works():
        pytest.skip("this torch build has no fp16 matmul/backward on the CPU")

    def scale_head(sd):
        sd["lm_head.weight"] *= 100.0

    base = tmp_path_factory.mktemp("fp16")
    model = edited_model(tiny_model_dir("llama"), base / "hot-model", scale_head)
    args = lambda out, *extra: train_args(model, sample_file, out, "model.dtype=float16", *extra)  # noqa: E731
    res = cli("ptune.train", *args(base / "run"))
    return model, base / "run", res, args


def test_fp16_overflow_steps_are_skipped_and_counted(fp16_runs):
    model, out, res, _ = fp16_runs
    assert res.rc == 0, str(res)
    warnings = [l for l in res.stderr.splitlines() if "fp16 overflow, update skipped" in l]
    log = logged(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    skipped = [r["skipped_steps"] for r in log]
    assert skipped[-1] == len(warnings) >= 1, (skipped, warnings)
    assert skipped == sorted(skipped)  # a running count
    # Each overflow step shows in the log as the step where the count went up, and the run went on.
    for w in warnings:
        step = int(w.split("step ")[1].split(":")[0])
        assert skipped[step - 1] == (skipped[step - 2] if step > 1 else 0) + 1
    state, _ = ck.load_trainer_state(out / "checkpoint-8")
    assert state["skipped_steps"] == skipped[-1]
    assert state["scaler"]["scale"] == 65536.0 / 2 ** skipped[-1]  # halved once per overflow, not yet regrown
    assert torch.isfinite(prefix_of(out / "checkpoint-8")).all()
    assert not torch.equal(prefix_of(out / "checkpoint-8"), prefix_of(out / "checkpoint-2"))


def test_fp16_resume_keeps_the_loss_scale_and_the_skip_count(fp16_runs, tmp_path):
    model, out, _, args = fp16_runs
    work = shutil.copytree(out, tmp_path / "run")
    for step in (4, 6, 8):
        shutil.rmtree(work / f"checkpoint-{step}")
    res = cli("ptune.train", *args(work, "resume=latest"))
    assert res.rc == 0, str(res)
    assert torch.equal(prefix_of(work / "checkpoint-8"), prefix_of(out / "checkpoint-8"))
    assert [r["skipped_steps"] for r in logged(work)] == [r["skipped_steps"] for r in logged(out)]
    assert ck.load_trainer_state(work / "checkpoint-8")[0]["scaler"] == \
        ck.load_trainer_state(out / "checkpoint-8")[0]["scaler"]


def _strict(constant):
    raise ValueError(f"{constant} is not JSON")


def test_fp16_train_log_stays_strict_json(fp16_runs):
    _, out, _, _ = fp16_runs
    for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line, parse_constant=_strict)
        assert all(not isinstance(v, float) or math.isfinite(v) for v in record.values())
