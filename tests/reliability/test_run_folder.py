"""A run folder holds one run's history: a fresh start among another run's checkpoints is refused, a rewind
keeps what it saves, a resume takes this run's optimizer settings, and what a crash can leave in the folder
(a torn log line, a damaged file) neither stops a resume silently nor with a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from conftest import REPO
from ptune import checkpoint as ck
from reliability_harness import (LONG, assert_clean_error, Background, cli, kill_quietly, logged, prefix_of,
                                 snapshot, train_args, train_in_background, write_long_rows)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, sample_file, tmp_path_factory):
    model = tiny_model_dir("llama")
    base = tmp_path_factory.mktemp("folder")
    ref = train_in_background(model, sample_file, base / "reference")
    yield model, sample_file, ref
    kill_quietly(ref.proc)


def copy_of(ref: Background, out, keep: tuple[int, ...]):
    """The reference run with only the checkpoints of `keep` and the log lines up to the last of them."""
    shutil.copytree(ref.result(), out)
    for ckpt in ck.list_checkpoints(out):
        if ck.checkpoint_step(ckpt) not in keep:
            shutil.rmtree(ckpt)
    lines = (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "train_log.jsonl").write_text("".join(lines[:max(keep)]), encoding="utf-8")
    return out


def test_a_fresh_start_among_an_earlier_runs_checkpoints_is_refused(setup, tmp_path):
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2, 4))
    before = snapshot(out)
    res = cli("ptune.train", *train_args(model, data, out, "optim.lr=0.01"))
    assert_clean_error(res, f"output_dir={out} already holds checkpoint-2, checkpoint-4 of an earlier run",
                       "resume=latest")
    assert snapshot(out, skip=("train.log",)) == {k: v for k, v in before.items() if k != "train.log"}


def test_resuming_another_folders_checkpoint_among_this_folders_checkpoints_is_refused(setup, tmp_path):
    """The two runs would mix: their checkpoints side by side, this folder's log cut back to the other's step."""
    model, data, ref = setup
    other = copy_of(ref, tmp_path / "other", keep=(2,))
    out = copy_of(ref, tmp_path / "run", keep=(2, 4))
    before = snapshot(out)
    res = cli("ptune.train", *train_args(model, data, out, f"resume={other / 'checkpoint-2'}"))
    assert_clean_error(res, f"resume={other / 'checkpoint-2'} is a checkpoint of another folder, and output_dir={out} "
                            "already holds checkpoint-2, checkpoint-4 of its own run", f"(output_dir={other})")
    assert snapshot(out, skip=("train.log",)) == {k: v for k, v in before.items() if k != "train.log"}
    # into an empty folder it goes on from there, as into its own
    res = cli("ptune.train", *train_args(model, data, tmp_path / "fresh", f"resume={other / 'checkpoint-2'}",
                                         "trainer.max_steps=3"))
    assert res.rc == 0, res.stderr[-2000:]
    assert [r["step"] for r in logged(tmp_path / "fresh")][-1] == 3


def test_a_rewind_keeps_the_checkpoint_it_saves_under_keep_last(setup, tmp_path):
    """Resumed from checkpoint-2 of a run that went on to checkpoint-4, with keep_last=1, the new checkpoint-3
    stays (pruning used to keep the highest step, the rewound run's checkpoint-4, and delete the new one)."""
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2, 4))
    res = cli("ptune.train", *train_args(model, data, out, f"resume={out / 'checkpoint-2'}", "trainer.max_steps=3",
                                         "trainer.save_steps=3", "trainer.keep_last=1"))
    assert res.rc == 0, str(res)
    assert "checkpoint-4 in" in res.stderr and "go on from the run being rewound" in res.stderr
    assert [p.name for p in ck.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert torch.equal(prefix_of(out / "checkpoint-4"), prefix_of(ref.result() / "checkpoint-4"))
    assert [r["step"] for r in logged(out)] == [1, 2, 3]


def test_an_update_that_leaves_the_prefix_non_finite_is_not_saved(setup, tmp_path):
    """A finite loss and gradient can still step the prefix to inf: the save refuses, so the folder never holds
    a complete checkpoint of NaN/inf weights, and the one before stays the latest."""
    model, data, ref = setup
    out = tmp_path / "run"
    res = cli("ptune.train", *train_args(model, data, out), fault={"fault": "overflow_in_step", "step": 4})
    assert_clean_error(res, "step 4: the prefix holds NaN or inf after the update and was not saved",
                       f"the last checkpoint in {out} is intact")
    assert ck.list_checkpoints(out) == [out / "checkpoint-2"]
    assert torch.equal(prefix_of(out / "checkpoint-2"), prefix_of(ref.result() / "checkpoint-2"))


def test_a_step_out_of_memory_names_the_micro_batch_and_what_fits_and_keeps_the_last_checkpoint(setup, tmp_path):
    model, data, ref = setup
    out = tmp_path / "run"
    res = cli("ptune.train", *train_args(model, data, out), fault={"fault": "oom_in_step", "step": 3})
    assert_clean_error(res, "step 3: out of memory on micro-batches of up to 2 rows of",
                       "(CUDA out of memory. Tried to allocate 2.00 GiB.", f"the last checkpoint in {out} is intact",
                       "Try a lower trainer.per_device_batch_size", "keep the global batch of 4",
                       "trainer.gradient_checkpointing=true", "trainer.auto_micro_batch_gib",
                       f"then go on with resume=latest output_dir={out}")
    assert ck.list_checkpoints(out) == [out / "checkpoint-2"]
    ck.verify(out / "checkpoint-2")
    assert torch.equal(prefix_of(out / "checkpoint-2"), prefix_of(ref.result() / "checkpoint-2"))
    # Before the first checkpoint there is nothing to go on from, and the line says so.
    res = cli("ptune.train", *train_args(model, data, tmp_path / "early"), fault={"fault": "oom_in_step", "step": 1})
    assert_clean_error(res, "step 1: out of memory", f"no checkpoint was written to {tmp_path / 'early'} yet")
    assert "resume=latest" not in res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA allocator's own out-of-memory error")
def test_a_step_past_the_allocators_limit_stops_in_one_line_and_writes_nothing(setup, tmp_path):
    """Not injected: the allocator is held to 256 MiB, far below what 512 rows of 576 tokens take."""
    model, _, _ = setup
    data = write_long_rows(tmp_path / "long.jsonl", 512)
    out = tmp_path / "run"
    res = cli("ptune.train", *train_args(model, data, out, *LONG, "trainer.per_device_batch_size=512",
                                         "trainer.gradient_accumulation_steps=1"),
              fault={"fault": "device_memory_cap", "mib": 256})
    assert_clean_error(res, "step 1: out of memory on micro-batches of up to 512 rows of", "CUDA out of memory",
                       f"no checkpoint was written to {out} yet", "Try a lower trainer.per_device_batch_size")
    assert not list(out.glob("*checkpoint-*"))


def test_a_refused_setting_leaves_no_run_folder_and_an_existing_one_as_it_was(setup, tmp_path):
    """Hydra makes the job's folder before the trainer starts: a typo on the command line must not leave an empty
    dated folder in outputs/ each time."""
    model, data, _ = setup
    out = tmp_path / "run"
    refused = train_args(model, data, out, "trainer.max_steps=0")
    assert_clean_error(cli("ptune.train", *refused), "error: trainer.max_steps=0: expected a whole number of at least 1")
    assert not out.exists()
    nested = tmp_path / "outputs" / "experiment" / "run"  # nor the parents made for it
    assert_clean_error(cli("ptune.train", *train_args(model, data, nested, "trainer.max_steps=0")), "max_steps=0")
    assert not (tmp_path / "outputs").exists()
    missing = tmp_path / "no-such-model"  # the first run's likeliest mistake: the model was never downloaded
    assert_clean_error(cli("ptune.train", *train_args(missing, data, out)), f"error: model.path={missing}: no such folder")
    assert not out.exists()
    assert_clean_error(cli("ptune.train", *train_args(model, data, out, "+trainer.max_stepz=3")), "trainer.max_stepz")
    assert not out.exists()
    typo = tmp_path / "train.jsnl"
    assert_clean_error(cli("ptune.train", *train_args(model, typo, out)), f"error: data.train_file={typo}: no such file")
    assert not out.exists()
    bad = tmp_path / "bad.jsonl"  # found, but refused when read: after train.log was begun
    bad.write_text(data.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    assert_clean_error(cli("ptune.train", *train_args(model, bad, out)), f"{bad}:")
    assert not out.exists()
    big = train_args(model, data, out, "trainer.per_device_batch_size=1000")  # refused once the rows are counted
    assert_clean_error(cli("ptune.train", *big), "error: a global batch of 2,000 rows")
    assert not out.exists()
    out.mkdir()  # a folder the user made, empty: theirs to keep
    assert_clean_error(cli("ptune.train", *refused), "error: trainer.max_steps=0")
    assert out.is_dir()
    (out / "train.log").write_text("an earlier run\n", encoding="utf-8")
    assert_clean_error(cli("ptune.train", *refused), "error: trainer.max_steps=0")
    assert [p.name for p in out.iterdir()] == ["train.log"]
    assert (out / "train.log").read_text(encoding="utf-8") == "an earlier run\n"


def test_a_multirun_whose_every_job_is_refused_leaves_no_sweep_folder(setup, tmp_path):
    """Each refused job's folder is removed; the sweep folder around them held Hydra's multirun.yaml alone."""
    model, data, _ = setup
    sweep = tmp_path / "sweep"
    args = ["-m", *train_args(model, data, tmp_path / "unused"), f"hydra.sweep.dir={sweep}", "trainer.max_steps=0,-1"]
    res = cli("ptune.train", *args)
    assert res.rc == 1 and "error: 2 of 2 multirun jobs failed:" in res.stderr, str(res)
    assert not sweep.exists() and not (tmp_path / "unused").exists()
    sweep.mkdir()  # a folder the user made: theirs to keep
    assert cli("ptune.train", *args).rc == 1
    assert sweep.is_dir()
    sweep = tmp_path / "outputs" / "sweep"  # a job's value Hydra refuses, after the sweep's folder was made
    res = cli("ptune.train", *args[:-2], f"hydra.sweep.dir={sweep}", "trainer.max_steps=1,abc")
    assert_clean_error(res, "error: trainer.max_steps='abc': expected a whole number")
    assert not (tmp_path / "outputs").exists()


def test_a_resume_takes_this_runs_optimizer_settings_and_says_what_changed(setup, tmp_path):
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2,))
    res = cli("ptune.train", *train_args(model, data, out, "resume=latest", "trainer.max_steps=4",
                                         "optim.weight_decay=0.5", "optim.eps=1e-6", "optim.betas=[0.8,0.99]", "seed=7",
                                         "trainer.gradient_accumulation_steps=1", "data.max_source_length=48",
                                         "model.template=plain"))
    assert res.rc == 0, str(res)
    assert "optimizer betas (0.9, 0.999) -> (0.8, 0.99), eps 1e-08 -> 1e-06, weight_decay 0.0 -> 0.5" in res.stderr
    assert (f"resume={out / 'checkpoint-2'}: data.max_source_length 128 -> 48, model.template 'chat_template' -> "
            "'plain'; from step 3 on the prefix trains on other prompts or targets") in res.stderr, res.stderr[-3000:]
    assert "it was trained with seed 42, this run's is 7" in res.stderr
    assert "it was trained with global batch 4, this run's is 2 (2 x 1 x 1 ranks)" in res.stderr
    group = ck.load_trainer_state(out / "checkpoint-4")[1]["param_groups"][0]
    assert (group["betas"], group["eps"], group["weight_decay"]) in (((0.8, 0.99), 1e-6, 0.5), ([0.8, 0.99], 1e-6, 0.5))
    assert not torch.equal(prefix_of(out / "checkpoint-4"), prefix_of(ref.result() / "checkpoint-4"))

    config = (out / "config.yaml").read_text(encoding="utf-8")
    again = cli("ptune.train", *train_args(model, data, out, "resume=latest", "trainer.max_steps=3"))
    assert again.rc == 0 and "is at step 4, trainer.max_steps=3: nothing to train" in again.stderr, str(again)
    assert (out / "config.yaml").read_text(encoding="utf-8") == config  # still the config that trained it


def test_a_torn_last_log_line_is_dropped_and_the_resume_ends_like_an_unbroken_run(setup, tmp_path):
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2, 4))
    whole = (ref.result() / "train_log.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    torn = whole[4][: len(whole[4]) // 2]  # a kill in the middle of appending step 5
    with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write(torn)
    res = cli("ptune.train", *train_args(model, data, out, "resume=latest"))
    assert res.rc == 0, str(res)
    assert f"{out / 'train_log.jsonl'}:5: not a whole log record" in res.stderr
    assert [r["loss"] for r in logged(out)] == [r["loss"] for r in logged(ref.result())]
    assert torch.equal(prefix_of(out / "checkpoint-8"), prefix_of(ref.result() / "checkpoint-8"))


def test_a_damaged_prefix_config_stops_a_resume_with_one_line(setup, tmp_path):
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2,))
    (out / "checkpoint-2" / "prefix_config.json").write_text('{"prefix": ', encoding="utf-8")
    res = cli("ptune.train", *train_args(model, data, out, "resume=latest"))
    assert_clean_error(res, f"error: {out / 'checkpoint-2' / 'prefix_config.json'}:", "manifest")
    assert json.loads((out / "checkpoint-2" / "manifest.json").read_text())  # nothing rewritten


def test_a_resume_between_log_lines_logs_the_losses_of_an_unbroken_run(setup, tmp_path):
    """Checkpoint 3 with a line every 2 steps: the line for step 4 is the mean of steps 3 and 4 in both runs (a
    resumed run used to log step 4 alone)."""
    model, data, _ = setup

    def args(out, *extra):
        return train_args(model, data, out, "trainer.max_steps=6", "trainer.save_steps=3", "trainer.log_steps=2",
                          *extra)

    straight, out = tmp_path / "straight", tmp_path / "run"
    assert cli("ptune.train", *args(straight)).rc == 0
    shutil.copytree(straight / "checkpoint-3", out / "checkpoint-3")
    first = (straight / "train_log.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[0]
    (out / "train_log.jsonl").write_text(first, encoding="utf-8")
    res = cli("ptune.train", *args(out, "resume=latest"))
    assert res.rc == 0, str(res)
    assert [(r["step"], r["loss"]) for r in logged(out)] == [(r["step"], r["loss"]) for r in logged(straight)]
    assert [r["step"] for r in logged(straight)] == [2, 4, 6]


@pytest.mark.parametrize("blocked", ["train.log", "train_log.jsonl"])
def test_a_run_file_that_cannot_be_written_is_one_line_naming_it(setup, tmp_path, blocked):
    """A read-only output_dir (or a full disk) used to end in an OSError traceback. Root, which runs these tests
    in some containers, may write anywhere, so a folder in the file's place stands in for the refusal."""
    model, data, _ = setup
    out = tmp_path / "run"
    (out / blocked).mkdir(parents=True)
    res = cli("ptune.train", *train_args(model, data, out, "trainer.max_steps=2"))
    assert_clean_error(res, f"error: could not write {out / blocked}: Is a directory")
    assert not ck.list_checkpoints(out)


@pytest.mark.parametrize("mode", ["run", "multirun"])
def test_a_run_folder_that_cannot_be_made_is_one_line_naming_the_setting(setup, tmp_path, mode):
    """Hydra makes the run's folder before ptune's code runs; under a file it used to end in Hydra's traceback
    (a file in the path stands in for a missing permission, which root would not feel)."""
    model, data, _ = setup
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    out = tmp_path / "file" / "run"
    if mode == "run":
        res = cli("ptune.train", *train_args(model, data, out))
        assert_clean_error(res, f"error: output_dir={out}: cannot create this folder (Not a directory)")
    else:
        res = cli("ptune.train", "-m", *train_args(model, data, tmp_path / "unused"), f"hydra.sweep.dir={out}",
                  "prefix.length=2,4")
        assert_clean_error(res, f"error: hydra.sweep.dir={out}: cannot create this folder (Not a directory)")
    assert (tmp_path / "file").read_text(encoding="utf-8") == "not a folder" and not (tmp_path / "unused").exists()


def test_an_empty_output_dir_is_refused_not_taken_as_the_current_folder(setup, tmp_path):
    """output_dir=$UNSET gives an empty value, which Hydra would take as the current folder and fill."""
    model, data, _ = setup
    res = cli("ptune.train", *train_args(model, data, tmp_path / "unused"), "output_dir=")
    assert_clean_error(res, "error: output_dir is empty; pass the folder to write the run to")
    assert not (REPO / "train.log").exists() and not (REPO / "checkpoint-8").exists()


def test_a_sigterm_before_the_first_step_leaves_no_fresh_run_folder(setup, tmp_path):
    """Stopped while it read its data, a run that had made its folder (and its train.log) removes them again."""
    model, data, _ = setup
    out = tmp_path / "new" / "run"
    res = cli("ptune.train", *train_args(model, data, out), fault={"fault": "sigterm_reading_data"})
    assert res.rc == 128 + 15 and res.stderr.splitlines()[-1] == "train interrupted (SIGTERM)", res.stderr[-2000:]
    assert not (tmp_path / "new").exists()


def test_a_second_training_into_a_folder_in_use_is_refused_and_changes_nothing(setup, tmp_path):
    """Two trainings given one folder (or the same dated default folder, started within one second) would
    interleave their checkpoints and log lines; the one that finds the folder held stops before writing."""
    from ptune.files import held_folder

    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2,))
    before = snapshot(out)
    with held_folder(out):  # as a training running there holds it
        res = cli("ptune.train", *train_args(model, data, out, "resume=latest"))
    assert_clean_error(res, f"{out}: another training is writing to this folder now", "give another output_dir")
    assert snapshot(out) == before  # not even a train.log line
    res = cli("ptune.train", *train_args(model, data, out, "resume=latest", "trainer.max_steps=4"))
    assert res.rc == 0, str(res)  # once let go, the folder is free again
    assert ck.checkpoint_step(ck.latest_checkpoint(out)) == 4


def test_a_folder_another_process_made_is_not_removed_by_this_ones_refusal(tmp_path):
    from ptune import config

    folder = tmp_path / "outputs" / "default" / "2026-11-29_12-00-00"
    config._make_folder(str(folder), "output_dir")  # made here, a moment after the other run made it too
    try:
        config.not_made_for_this_run(folder)
        config.remove_unused_run_folders()
        assert folder.is_dir()
    finally:
        config._made_run_folders.clear()


def test_a_multirun_whose_sweep_folder_another_multirun_holds_is_refused_job_by_job(setup, tmp_path):
    """Two multiruns started in the same second share multirun_<time>/: each job's own folder lock let them take
    turns, one grid's jobs among the other's. The first multirun holds the sweep folder for all its jobs."""
    from ptune.files import held_folder

    model, data, _ = setup
    sweep = tmp_path / "grid"
    sweep.mkdir()
    args = [a for a in train_args(model, data, tmp_path / "unused", "trainer.max_steps=2")
            if not a.startswith("output_dir=")]
    with held_folder(sweep):  # as the other multirun's process holds it
        res = cli("ptune.train", "-m", *args, "optim.lr=0.05,0.01", f"hydra.sweep.dir={sweep}")
    assert res.rc == 1 and "Traceback" not in res.stderr, str(res)
    assert "error: 2 of 2 multirun jobs failed" in res.stderr, res.stderr
    assert f"#1 (optim.lr=0.01): {sweep}: another multirun is writing to this folder now" in res.stderr
    assert not list(sweep.glob("*/checkpoint-*"))
    res = cli("ptune.train", "-m", *args, "optim.lr=0.05,0.01", f"hydra.sweep.dir={sweep}")
    assert res.rc == 0, str(res)
    assert [p.name for p in sorted(sweep.glob("*/checkpoint-2"))] == ["checkpoint-2", "checkpoint-2"]


def test_a_resume_with_nothing_to_train_leaves_the_runs_log_config_and_plot(setup, tmp_path):
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2, 4, 6, 8))
    before = snapshot(out, skip=("train.log",))
    res = cli("ptune.train", *train_args(model, data, out, f"resume={out / 'checkpoint-4'}", "trainer.max_steps=4"))
    assert res.rc == 0 and "nothing to train" in res.stderr, str(res)
    assert snapshot(out, skip=("train.log",)) == before  # train_log.jsonl's 8 lines, config.yaml, train_loss.png


def test_keep_last_that_cannot_remove_a_checkpoint_warns_and_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    import ptune.checkpoint as ckpt

    run = tmp_path / "run"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(run, step, {"embedding.weight": torch.zeros(2, 4)}, {"prefix": {}, "base": {},
                                                                              "model": {}, "data": {}})
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # a file it cannot delete: nothing goes
    removed, failed = ckpt.prune(run, keep_last=1)
    assert removed == [run / "checkpoint-1", run / "checkpoint-2"] and len(failed) == 2
    assert "could not be removed whole" in failed[0]
    assert [p.name for p in ckpt.checkpoint_folders(run)] == ["checkpoint-3"]  # none left standing half-deleted
    monkeypatch.undo()
    assert ckpt.remove_stale_temporaries(run) and not list(run.glob(".checkpoint-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="folder permissions are not enforced for this user")
def test_a_run_folder_that_takes_no_new_file_is_refused_before_the_first_step(setup, tmp_path):
    """Its files may each be writable while the folder takes no new one: found at the first save, every step
    before it was lost."""
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2,))
    out.chmod(0o555)
    try:
        res = cli("ptune.train", *train_args(model, data, out, "resume=latest"))
    finally:
        out.chmod(0o755)
    assert_clean_error(res, f"output_dir: {out} is read-only: a checkpoint could not be saved there")
    assert not logged(out)[2:]


def test_a_resume_on_other_training_data_or_another_base_folder_says_so(setup, tmp_path):
    """The checkpoint records its training file and that file's SHA-256: another file, or the same one edited, takes
    other rows from the resumed step on; a base from another folder may hold other weights of the same shape."""
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2,))
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["train_file"] == str(data.resolve())
    assert state["train_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    quiet = cli("ptune.train", *train_args(model, data, out, "resume=latest", "trainer.max_steps=3"))
    assert quiet.rc == 0 and "it was trained on" not in quiet.stderr, str(quiet)

    other = tmp_path / "other.jsonl"
    other.write_text("".join(data.read_text(encoding="utf-8").splitlines(keepends=True)[:20]), encoding="utf-8")
    moved = shutil.copytree(model, tmp_path / "base-copy")
    res = cli("ptune.train", *train_args(moved, other, out, "resume=latest", "trainer.max_steps=4"))
    assert res.rc == 0, str(res)
    assert (f"resume={out / 'checkpoint-3'}: it was trained on {data.resolve()}, this run reads {other.resolve()}; "
            "from step 4 on the rows are not the ones the original run would have had") in res.stderr, res.stderr
    assert f"it was trained on the base in {model.resolve()}, this run's is {moved.resolve()}" in res.stderr

    with other.open("a", encoding="utf-8") as f:  # the same file, edited
        f.write(data.read_text(encoding="utf-8").splitlines(keepends=True)[30])
    res = cli("ptune.train", *train_args(moved, other, out, "resume=latest", "trainer.max_steps=5"))
    assert res.rc == 0 and f"it was trained on {other.resolve()} as it was then (the file has changed since)" in \
        res.stderr, str(res)


def test_a_resume_whose_schedule_gives_another_learning_rate_says_so(setup, tmp_path):
    """trainer.max_steps (or optim.lr, warm-up, schedule) changed on resume moves the linear schedule: the rate
    jumps at the resumed step, which the log now says with both numbers."""
    model, data, ref = setup
    out = copy_of(ref, tmp_path / "run", keep=(2,))
    same = cli("ptune.train", *train_args(model, data, out, "resume=latest", "trainer.max_steps=8",
                                          "trainer.save_steps=4"))
    assert same.rc == 0 and "learning rate" not in same.stderr, str(same)
    out = copy_of(ref, tmp_path / "other", keep=(2,))
    res = cli("ptune.train", *train_args(model, data, out, "resume=latest", "trainer.max_steps=4"))
    assert res.rc == 0, str(res)
    assert (f"resume={out / 'checkpoint-2'}: step 3's learning rate is 0.025 under this run's schedule "
            "(trainer.max_steps=4, optim.lr, warmup_steps and schedule), where the run that saved it would have "
            "used 0.0375: the rate jumps there") in res.stderr, res.stderr[-2000:]
