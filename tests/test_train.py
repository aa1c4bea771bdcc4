"""The trainer end to end, through its command line, on tiny real models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO, free_socket, logged, run_train, small_run
from ptune.checkpoint import list_checkpoints


@pytest.mark.slow
def test_adgen_60steps_writes_checkpoint_and_loss_falls(tiny_model_dir, sample_file, tmp_path):
    out = tmp_path / "run"
    run_train("+experiment=adgen_60steps", f"model.path={tiny_model_dir('llama')}", f"data.train_file={sample_file}",
              f"output_dir={out}")
    ckpt = out / "checkpoint-60"
    weights = load_file(ckpt / "prefix.safetensors")
    assert weights["embedding.weight"].shape == (128, 2 * 2 * 2 * 8)  # length x layers*2*kv_heads*head_dim
    config = json.loads((ckpt / "prefix_config.json").read_text())
    assert config["step"] == 60 and config["prefix"]["length"] == 128
    losses = [r["loss"] for r in logged(out)]
    assert [r["step"] for r in logged(out)] == [10, 20, 30, 40, 50, 60]
    # A random tiny base leaves the prefix little to learn, but the loss must go down at every log.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.02, losses
    assert list_checkpoints(out) == [ckpt]
    assert (out / "config.yaml").is_file() and (out / "tensorboard").is_dir()


def test_resume_is_bitwise_exact(tiny_model_dir, sample_file, tmp_path):
    model = tiny_model_dir("llama")
    out = tmp_path / "run"
    run_train(*small_run(model, sample_file, out))
    straight = load_file(out / "checkpoint-6" / "prefix.safetensors")["embedding.weight"]
    straight_log = logged(out)
    # As if the run died after saving step 3: drop the later checkpoint, then resume.
    shutil.rmtree(out / "checkpoint-6")
    run_train(*small_run(model, sample_file, out, "resume=latest"))
    resumed = load_file(out / "checkpoint-6" / "prefix.safetensors")["embedding.weight"]
    assert torch.equal(straight, resumed)
    assert not torch.equal(straight, load_file(out / "checkpoint-3" / "prefix.safetensors")["embedding.weight"])
    assert [r["step"] for r in logged(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged(out)] == [r["loss"] for r in straight_log]
    assert (out / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m"]
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
    with free_socket() as sock:
        port = sock.getsockname()[1]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), "-m", "ptune.train", *overrides], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_a_run_file_rank_0_cannot_write_stops_every_rank(tiny_model_dir, sample_file, tmp_path):
    """Rank 0 alone writes the run folder; where that fails, the other ranks stop with it instead of waiting in
    their next collective until the process group's timeout (half an hour)."""
    out = tmp_path / "run"
    (out / "train_log.jsonl").mkdir(parents=True)  # stands in for a file that cannot be written (root ignores modes)
    proc = two_gloo_ranks(*small_run(tiny_model_dir("llama"), sample_file, out))
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert f"error: could not write {out / 'train_log.jsonl'}" in err, err[-3000:]
    assert "error: rank 0 stopped writing the run folder (its error is above); stopping with it" in err, err[-3000:]


def worker_pids(agent: int) -> list[int]:
    children = set()
    for task in os.listdir(f"/proc/{agent}/task"):
        children.update(int(c) for c in open(f"/proc/{agent}/task/{task}/children").read().split())
    return sorted(children)


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
        proc.kill()
    stopped = [line for line in err.splitlines() if "stopped by signal 15 after step" in line]
    assert stopped, err[-3000:]
    at = int(stopped[0].split("after step ")[1].split(";")[0])
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{at}"] and at < 500
    assert [r["step"] for r in logged(out)][-1] == at


def test_a_warmup_longer_than_the_run_is_warned_about(tiny_model_dir, sample_file, tmp_path):
    proc = run_train(*small_run(tiny_model_dir("llama"), sample_file, tmp_path / "run", "trainer.max_steps=2",
                                "optim.warmup_steps=8", "optim.lr=0.04"))
    assert ("optim.warmup_steps=8 is more than trainer.max_steps=2: the learning rate only reaches 0.01, not "
            "optim.lr=0.04") in proc.stderr, proc.stderr[-3000:]


def test_gradient_checkpointing_run(tiny_model_dir, sample_file, tmp_path):
    model = tiny_model_dir("qwen2")
    run_train(*small_run(model, sample_file, tmp_path / "off", "prefix.dropout=0", "trainer.max_steps=2"))
    run_train(*small_run(model, sample_file, tmp_path / "on", "prefix.dropout=0", "trainer.max_steps=2",
                         "trainer.gradient_checkpointing=true"))
    a = load_file(tmp_path / "off" / "checkpoint-2" / "prefix.safetensors")["embedding.weight"]
    b = load_file(tmp_path / "on" / "checkpoint-2" / "prefix.safetensors")["embedding.weight"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_missing_model_path_is_a_clear_error(sample_file, tmp_path):
    proc = run_train(f"model.path={tmp_path / 'nope'}", f"data.train_file={sample_file}",
                     f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    assert f"model.path={tmp_path / 'nope'}: no such folder" in proc.stderr


def test_quantized_base_trains_and_evaluates_through_the_command_line(tiny_model_dir, sample_file, tmp_path):
    model = tiny_model_dir("llama")
    out = tmp_path / "run"
    run_train(*small_run(model, sample_file, out, "trainer.max_steps=2", "trainer.save_steps=2",
                         "model.quantization=int8", f"model.quantization_cache={tmp_path / 'q8'}"))
    config = json.loads((out / "checkpoint-2" / "prefix_config.json").read_text())
    assert config["model"]["quantization"] == "int8"
    assert (tmp_path / "q8" / "quantization.json").is_file()
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in logged(out))
    proc = subprocess.run([sys.executable, "-m", "ptune.evaluate", f"checkpoint={out / 'checkpoint-2'}",
                           f"data.eval_file={sample_file}", "limit=3", "generation.max_new_tokens=4", "device=cpu",
                           f"output_dir={tmp_path / 'eval'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 3


def test_hydra_multirun_gives_one_run_folder_per_combination(tiny_model_dir, sample_file, tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", f"model.path={tiny_model_dir('llama')}", f"data.train_file={sample_file}",
              f"hydra.sweep.dir={sweep}", "trainer.max_steps=1", "trainer.save_steps=1",
              "trainer.per_device_batch_size=2", "trainer.gradient_accumulation_steps=1", "trainer.progress_bar=false",
              "trainer.tensorboard=false", "prefix.length=2,4")
    lengths = {}
    for job in ("0", "1"):
        (ckpt,) = list_checkpoints(sweep / job)
        lengths[job] = json.loads((ckpt / "prefix_config.json").read_text())["prefix"]["length"]
        # the recorded config names the folder the job wrote to, so resume=latest with it finds the job's run
        assert OmegaConf.load(sweep / job / "config.yaml").output_dir == str(sweep / job)
    assert lengths == {"0": 2, "1": 4}


def test_group_by_length_run_resumes_bitwise(tiny_model_dir, sample_file, tmp_path):
    """Grouped batches are a pure function of (seed, step) too: resumed from step 3, a run ends where the
    unbroken one did, and the grouping changed what was trained."""
    model = tiny_model_dir("llama")
    out = tmp_path / "run"
    run_train(*small_run(model, sample_file, out, "trainer.group_by_length=4"))
    straight = load_file(out / "checkpoint-6" / "prefix.safetensors")["embedding.weight"]
    straight_log = logged(out)
    shutil.rmtree(out / "checkpoint-6")
    run_train(*small_run(model, sample_file, out, "trainer.group_by_length=4", "resume=latest"))
    assert torch.equal(straight, load_file(out / "checkpoint-6" / "prefix.safetensors")["embedding.weight"])
    assert [r["loss"] for r in logged(out)] == [r["loss"] for r in straight_log]
    plain = tmp_path / "plain"
    run_train(*small_run(model, sample_file, plain))
    assert [r["loss"] for r in logged(plain)] != [r["loss"] for r in straight_log]


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
