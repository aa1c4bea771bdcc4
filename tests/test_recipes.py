"""recipes/adgen_smollm2.sh end to end on a tiny model: split, base score, training, checkpoint sweep; and
recipes/multi_node.sh as two machines on one host."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_socket, logged, small_run

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "adgen_smollm2.sh"


def run_recipe(src: Path, out: Path, model: Path, holdout: int, *overrides: str,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL": str(model), "HOLDOUT": str(holdout)}
    return subprocess.run(["bash", str(RECIPE), str(src), str(out), *overrides], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd)


def test_adgen_smollm2_recipe_scores_base_and_every_checkpoint(tiny_model_dir, sample_file, tmp_path):
    rows = [line for line in sample_file.read_text(encoding="utf-8").splitlines() if line.strip()][:10]
    src = tmp_path / "adgen.jsonl"
    src.write_text("\n".join(rows[:6]) + "\n\n" + "\n".join(rows[6:]) + "\n", encoding="utf-8")  # a blank line too
    out = tmp_path / "e2e ünï,[1]"  # a folder name Hydra would not read unquoted
    # run from the data's folder with paths relative to it, as the caller's (the recipe works in the repository)
    model = Path(os.path.relpath(tiny_model_dir("llama"), tmp_path))
    proc = run_recipe(Path(src.name), Path(out.name), model, 3, "prefix.length=4", "trainer.max_steps=2",
                      "trainer.save_steps=1", "trainer.per_device_batch_size=2", "trainer.progress_bar=false",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The last HOLDOUT rows are held out, in order, and never trained on.
    assert (out / "train.jsonl").read_text(encoding="utf-8").splitlines() == rows[:7]
    assert (out / "dev.jsonl").read_text(encoding="utf-8").splitlines() == rows[7:]
    base = json.loads((out / "eval-base" / "metrics.json").read_text())
    assert base["checkpoint"] is None and base["num_samples"] == 3
    assert base["data"]["max_source_length"] == 256 and base["generation"]["max_new_tokens"] == 384
    sweep = (out / "run" / "sweep" / "sweep.md").read_text(encoding="utf-8")
    assert "run/checkpoint-1 |" in sweep and "run/checkpoint-2 |" in sweep
    for step in (1, 2):
        metrics = json.loads((out / "run" / f"checkpoint-{step}" / "eval" / "metrics.json").read_text())
        assert metrics["num_samples"] == 3 and metrics["data"]["max_target_length"] == 384
    assert [line.split()[0] for line in (out / "timings.txt").read_text().splitlines()] == [
        "prepare", "evaluate-base", "train", "sweep"]
    assert (out / "run" / "train_loss.png").is_file() and (out / "run" / "sweep" / "sweep.png").is_file()


def test_adgen_smollm2_recipe_refuses_a_holdout_as_large_as_the_file(tiny_model_dir, sample_file, tmp_path):
    src = tmp_path / "adgen.jsonl"
    src.write_text("\n".join(sample_file.read_text(encoding="utf-8").splitlines()[:4]) + "\n", encoding="utf-8")
    proc = run_recipe(src, tmp_path / "e2e", tiny_model_dir("llama"), 4)
    assert proc.returncode == 2
    assert f"{src} has 4 rows; need more than HOLDOUT=4" in proc.stderr
    assert not (tmp_path / "e2e" / "train.jsonl").exists()


MULTI_NODE = REPO / "recipes" / "multi_node.sh"


@pytest.mark.parametrize("env, message", [
    ({}, "NNODES= is not a number of machines (1 or more)"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"}, "NODE_RANK=2 is not one of 0 .. 1"),
    ({"NNODES": "2", "NODE_RANK": "1"}, "MASTER_ADDR is not set: give an address of machine 0 the others reach"),
    ({"NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "NPROC": "0"},
     "NPROC=0 is not a number of processes (1 or more)"),
])
def test_multi_node_recipe_refuses_an_incomplete_setting_naming_it(env, message):
    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "NPROC")}
    proc = subprocess.run(["bash", str(MULTI_NODE), "+experiment=quickstart"], capture_output=True, text=True,
                          env={**base, **env}, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == f"multi_node.sh: {message}", proc.stderr
    assert "set -euo" not in proc.stderr  # the usage shown is the comment block alone


def two_machines(args: list[str], wrap: tuple[list[str], list[str]] = ([], [])) -> list[tuple[int, str]]:
    """recipes/multi_node.sh launched as machine 0 and machine 1 on this host, each command after its `wrap`
    prefix: (status, stderr) of each."""
    with free_socket() as sock:
        port = sock.getsockname()[1]
    env = {**os.environ, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NPROC": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    procs = [subprocess.Popen([*prefix, "bash", str(MULTI_NODE), *args], env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, prefix in enumerate(wrap)]
    try:
        return [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            p.kill()


def test_multi_node_recipe_trains_as_two_machines_on_one_host(tiny_model_dir, sample_file, tmp_path):
    """Two launches with NODE_RANK 0 and 1 meet at MASTER_ADDR and train as one run of two ranks; only rank 0
    (machine 0) writes the shared output folder."""
    out = tmp_path / "run"
    args = small_run(tiny_model_dir("llama"), sample_file, out, "trainer.max_steps=2", "trainer.save_steps=2")
    results = two_machines(args)
    for code, err in results:
        assert code == 0, err[-3000:]
    assert "machine 1 of 2, 1 process(es) here" in results[1][1]
    assert "global batch 8 (2 x 2 x 2 ranks)" in results[0][1]
    assert [r["step"] for r in logged(out)] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.yaml", "train.log", "train_log.jsonl",
                                                       "train_loss.png"]


def test_machines_that_find_different_checkpoints_stop_together_naming_them(
        trained_checkpoint, tiny_model_dir, sample_file, tmp_path):
    """Each machine reads output_dir on its own disk: where machine 0 finds checkpoint-2 and machine 1 (whose
    view of the folder is an empty one, mounted over it in its own mount namespace) none, both stop at once
    with one line, instead of training two different runs or waiting on each other."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (a mount namespace) to give machine 1 its own view of output_dir")
    run, empty = tmp_path / "run", tmp_path / "empty"
    shutil.copytree(trained_checkpoint.parent, run)
    empty.mkdir()
    args = small_run(tiny_model_dir("llama"), sample_file, run, "resume=latest", "trainer.max_steps=4")
    own_disk = ["unshare", "-m", "sh", "-c", f"mount --bind {empty} {run} && exec \"$0\" \"$@\""]
    results = two_machines(args, ([], own_disk))
    for code, err in results:
        # (torchrun's own agent reports a failed rank with a traceback of its own; none comes from ptune)
        assert code == 1 and not re.search(r'File ".*/ptune/', err), err[-3000:]
        assert "the ranks do not find the same checkpoint" in err and "(rank 0: checkpoint-2, rank 1: none, so " \
            "afresh); on several machines output_dir must be a folder they all share" in err, err[-3000:]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
