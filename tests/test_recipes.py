"""recipes/adgen_smollm2.sh end to end on a tiny model: split, base score, training, checkpoint sweep."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "adgen_smollm2.sh"


def run_recipe(src: Path, out: Path, model: Path, holdout: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL": str(model), "HOLDOUT": str(holdout)}
    return subprocess.run(["bash", str(RECIPE), str(src), str(out), *overrides], capture_output=True, text=True,
                          env=env, timeout=600)


def test_adgen_smollm2_recipe_scores_base_and_every_checkpoint(tiny_model_dir, sample_file, tmp_path):
    rows = [line for line in sample_file.read_text(encoding="utf-8").splitlines() if line.strip()][:10]
    src = tmp_path / "adgen.jsonl"
    src.write_text("\n".join(rows[:6]) + "\n\n" + "\n".join(rows[6:]) + "\n", encoding="utf-8")  # a blank line too
    out = tmp_path / "e2e"
    proc = run_recipe(src, out, tiny_model_dir("llama"), 3, "prefix.length=4", "trainer.max_steps=2",
                      "trainer.save_steps=1", "trainer.per_device_batch_size=2", "trainer.progress_bar=false")
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
