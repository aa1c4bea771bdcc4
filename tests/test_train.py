"""The trainer end to end, through its command line, on tiny real models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO, logged, run_train, small_run
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


@pytest.mark.parametrize("resume", ["latest", "the run folder"])
def test_resume_is_bitwise_exact(tiny_model_dir, sample_file, tmp_path, resume):
    model = tiny_model_dir("llama")
    out = tmp_path / "run"
    run_train(*small_run(model, sample_file, out))
    straight = load_file(out / "checkpoint-6" / "prefix.safetensors")["embedding.weight"]
    straight_log = logged(out)
    # As if the run died after saving step 3: drop the later checkpoint, then resume (a run folder stands for its
    # newest complete checkpoint, as in evaluate and chat).
    shutil.rmtree(out / "checkpoint-6")
    run_train(*small_run(model, sample_file, out, f"resume={'latest' if resume == 'latest' else out}"))
    resumed = load_file(out / "checkpoint-6" / "prefix.safetensors")["embedding.weight"]
    assert torch.equal(straight, resumed)
    assert not torch.equal(straight, load_file(out / "checkpoint-3" / "prefix.safetensors")["embedding.weight"])
    assert [r["step"] for r in logged(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged(out)] == [r["loss"] for r in straight_log]
    assert (out / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_a_model_path_that_is_a_file_says_so(sample_file, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    proc = run_train(f"model.path={tmp_path / 'model.safetensors'}", f"data.train_file={sample_file}",
                     f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1
    assert f"model.path={tmp_path / 'model.safetensors'}: a file, not a folder" in proc.stderr


def test_missing_model_path_is_a_clear_error(sample_file, tmp_path):
    proc = run_train(f"model.path={tmp_path / 'nope'}", f"data.train_file={sample_file}",
                     f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    assert f"model.path={tmp_path / 'nope'}: no such folder" in proc.stderr


def test_the_missing_default_model_names_the_command_that_makes_it(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from ptune.models import ModelError, load_base
    from ptune.quickstart import DEFAULT_MODEL_DIR

    monkeypatch.chdir(tmp_path)  # a fresh machine: the quickstart has not made it here
    with pytest.raises(ModelError) as e:
        load_base(OmegaConf.create({"path": str(DEFAULT_MODEL_DIR)}))
    assert str(e.value).startswith(f"model.path={DEFAULT_MODEL_DIR}: no such folder")
    assert "`python -m ptune.quickstart prepare-model` makes it here" in str(e.value)
    assert "relative to where you run" in str(e.value)
    with pytest.raises(ModelError) as other:
        load_base(OmegaConf.create({"path": "elsewhere"}))
    assert "quickstart" not in str(other.value)  # only the default is the quickstart's to make


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


def test_paths_starting_with_a_tilde_are_in_the_home_folder(tiny_model_dir, sample_file, tmp_path):
    """Quoted for Hydra, output_dir="~/runs/x" is the home's runs/x, not a folder named ~ in the working folder."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(sample_file, home / "train.jsonl")
    run_train(*small_run(tiny_model_dir("llama"), "unused", "unused", 'data.train_file="~/train.jsonl"',
                         'output_dir="~/runs/x"', "trainer.max_steps=1", "trainer.save_steps=1"), env={"HOME": str(home)})
    assert list_checkpoints(home / "runs" / "x") == [home / "runs" / "x" / "checkpoint-1"]
    assert not (REPO / "~").exists()
    # hydra.sweep.dir given on the command line is Hydra's own, taken literally: refused, naming the full path
    proc = run_train("-m", *small_run(tiny_model_dir("llama"), sample_file, "unused")[:2], 'hydra.sweep.dir="~/sw"',
                     "prefix.length=2,4", check=False, env={"HOME": str(home)})
    assert proc.returncode == 1 and proc.stderr.endswith(
        f"error: hydra.sweep.dir=~/sw: ~ is not expanded here, the folder would be ./~/sw; give the full path, "
        f"hydra.sweep.dir={home}/sw\n"), proc.stderr[-2000:]
    assert not (REPO / "~").exists() and not (home / "sw").exists()


def test_output_dir_in_a_multirun_is_refused_naming_hydra_sweep_dir(tiny_model_dir, sample_file, tmp_path):
    """Each job of a multirun writes to <hydra.sweep.dir>/<job number>: an output_dir would go unused, silently."""
    sweep = tmp_path / "sweep"
    proc = run_train("-m", f"model.path={tiny_model_dir('llama')}", f"data.train_file={sample_file}",
                     f"output_dir={tmp_path / 'mine'}", f"hydra.sweep.dir={sweep}", "prefix.length=2,4", check=False)
    assert proc.returncode == 1
    assert (f"#0 (prefix.length=2): output_dir={tmp_path / 'mine'}: a multirun (-m) writes each job to "
            f"hydra.sweep.dir/<job number> ({sweep}/0, /1, ...), not to output_dir; pass "
            f"hydra.sweep.dir={tmp_path / 'mine'} instead") in proc.stderr, proc.stderr[-3000:]
    assert not sweep.exists() and not (tmp_path / "mine").exists()


def test_resume_latest_into_a_folder_made_for_this_run_warns_that_nothing_is_resumed(tiny_model_dir, sample_file,
                                                                                     tmp_path):
    out = tmp_path / "typo" / "run"
    proc = run_train(*small_run(tiny_model_dir("llama"), sample_file, out, "resume=latest", "trainer.max_steps=1"))
    assert (f"WARNING ptune.train] resume=latest: {out} was made just now for this run, so there is no checkpoint to "
            "go on from; starting fresh") in proc.stderr, proc.stderr[-3000:]
    proc = run_train(*small_run(tiny_model_dir("llama"), sample_file, out, "resume=latest", "trainer.max_steps=2"))
    assert "made just now" not in proc.stderr and [r["step"] for r in logged(out)] == [1, 2]


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


def train_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("overrides, rows, recomputed, offered, left_out", [
    # The built-in run: every way is open.
    ([], 4, 0, ["a lower trainer.per_device_batch_size (and a higher trainer.gradient_accumulation_steps to keep "
                "the global batch of 16)", "trainer.gradient_checkpointing=true",
                "trainer.auto_micro_batch_gib=<GiB> to pick the split that fits",
                "model.quantization=int8 or int4", "or a device with more memory"], []),
    # A micro-batch of one row, every layer recomputed, a 4-bit base: only shorter rows or another device.
    (["trainer.per_device_batch_size=1", "trainer.gradient_checkpointing=true", "model.quantization=int4"], 1, 2,
     ["shorter rows (data.max_source_length=64, data.max_target_length=128)", "or a device with more memory"],
     ["per_device_batch_size", "gradient_checkpointing", "auto_micro_batch_gib", "model.quantization"]),
    # The split was measured to peak under a ceiling: only a lower ceiling (or more free memory) shrinks the step;
    # recomputing more, shorter rows or a smaller base would let it take more rows up to the same peak, and it
    # ignores per_device_batch_size.
    (["trainer.auto_micro_batch_gib=20", "model.quantization=int8"], 8, 0,
     ["a lower trainer.auto_micro_batch_gib than 20", "or free the device's memory"],
     ["per_device_batch_size", "auto_micro_batch_gib=<GiB>", "gradient_checkpointing", "quantization", "rows"]),
    (["trainer.auto_micro_batch_gib=20", "trainer.gradient_checkpointing=auto"], 8, 1,
     ["a lower trainer.auto_micro_batch_gib than 20"], ["gradient_checkpointing"]),
])
def test_a_step_out_of_memory_offers_only_the_settings_that_can_still_shrink_it(overrides, rows, recomputed, offered,
                                                                               left_out):
    from ptune.train import smaller_step

    cfg = train_config("data.max_source_length=64", "data.max_target_length=128", *overrides)
    ways = smaller_step(cfg, rows, 16, recomputed, 2)
    said = ", ".join(ways)
    for way in offered:
        assert way in said, (way, ways)
    for setting in left_out:
        assert setting not in said, (setting, ways)
    assert ways[-1].startswith("or ")
