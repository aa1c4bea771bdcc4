"""`trainer.auto_micro_batch_gib`: the largest micro-batch measured to fit a memory ceiling (ptune.fit)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import logged, run_train, small_run
from ptune.data import BatchPlan
from ptune.fit import divisors_descending, micro_batch_shapes, outermost

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the probe measures GPU memory")


def test_divisors_and_outermost_shapes():
    assert divisors_descending(16) == [16, 8, 4, 2, 1] and divisors_descending(12) == [12, 6, 4, 3, 2, 1]
    assert divisors_descending(7) == [7, 1]
    shapes = {(4, 100), (4, 90), (2, 100), (12, 16), (6, 16), (12, 14), (1, 100)}
    assert outermost(shapes) == [(12, 16), (4, 100)]


def test_sorted_micro_batches_of_short_rows_hold_more_rows_than_the_setting():
    """Why the plan is walked: with sorting, a micro-batch of short rows takes up to the padded size of
    `micro` long ones, so it holds more rows (and more per-row prefix copies) than `micro`."""
    g = random.Random(0)
    lengths = [g.choice([12, 14, 16, 90, 100]) for _ in range(64)]
    plan = BatchPlan(lengths, [5] * 64, 4, 4, 1, 0, True, 0)
    shapes = micro_batch_shapes(plan, lengths, 20)
    assert max(rows for rows, _ in shapes) > 4
    assert all(rows * length <= 4 * 100 for rows, length in shapes)  # never more tokens than 4 of the longest
    wide = outermost(shapes)
    assert (4, 100) in wide and any(rows > 4 for rows, _ in wide)
    # Unsorted, every micro-batch has exactly `micro` rows.
    plain = BatchPlan(lengths, [5] * 64, 4, 4, 1, 0, False, 0)
    assert {rows for rows, _ in micro_batch_shapes(plain, lengths, 20)} == {4}


def test_ceiling_must_be_positive_and_needs_a_gpu(tiny_model_dir, sample_file, tmp_path):
    model = tiny_model_dir("llama")
    bad = run_train(*small_run(model, sample_file, tmp_path / "a", "trainer.auto_micro_batch_gib=0"), check=False)
    assert bad.returncode != 0 and "trainer.auto_micro_batch_gib=0.0: a ceiling in GiB above 0" in bad.stderr
    if torch.cuda.is_available():
        return
    cpu = run_train(*small_run(model, sample_file, tmp_path / "b", "trainer.auto_micro_batch_gib=8"), check=False)
    assert cpu.returncode != 0
    assert "trainer.auto_micro_batch_gib=8.0: it measures GPU memory and needs a CUDA device, not cpu" in cpu.stderr
    assert "Traceback" not in cpu.stderr


def _fitted(run) -> tuple[int, int, dict[int, float]]:
    """(micro-batch, accumulation, {micro-batch: measured peak}) from the run's auto_micro_batch.json."""
    report = json.loads((run / "auto_micro_batch.json").read_text())
    return (report["micro_batch"], report["gradient_accumulation_steps"],
            {p["micro_batch"]: p["peak_gib"] for p in report["probes"]})


@needs_cuda
@pytest.mark.parametrize("graphs", ["true", "false"])
def test_largest_fitting_micro_batch_is_chosen_and_trains_like_that_setting(tiny_model_dir, sample_file, tmp_path,
                                                                           graphs):
    """A ceiling above every candidate takes all 8 rows at once; one just under the 8-row peak takes the next
    split that fits, which trains exactly as setting that split by hand does; a ceiling nothing fits is
    refused, naming what would help."""
    model = tiny_model_dir("glm")
    common = ["trainer.per_device_batch_size=1", "trainer.gradient_accumulation_steps=8", "trainer.max_steps=4",
              "trainer.save_steps=4", "model.dtype=bfloat16", f"trainer.cuda_graphs={graphs}"]
    run_train(*small_run(model, sample_file, tmp_path / "roomy", *common, "trainer.auto_micro_batch_gib=500"))
    micro, accum, peaks = _fitted(tmp_path / "roomy")
    assert (micro, accum) == (8, 1) and list(peaks) == [8]

    ceiling = peaks[8] * (1 - 1e-6)
    tight = run_train(*small_run(model, sample_file, tmp_path / "tight", *common,
                                 f"trainer.auto_micro_batch_gib={ceiling!r}"))
    micro, accum, peaks = _fitted(tmp_path / "tight")
    assert micro < 8 and micro * accum == 8 and peaks[micro] <= ceiling < peaks[8]
    assert list(peaks) == [m for m in (8, 4, 2, 1) if m >= micro]  # largest first, stopping at the first fit
    assert f"{micro} x {accum} (measured peak" in tight.stderr
    run_train(*small_run(model, sample_file, tmp_path / "by_hand", *common[2:], f"trainer.per_device_batch_size={micro}",
                         f"trainer.gradient_accumulation_steps={accum}"))
    assert [r["loss"] for r in logged(tmp_path / "tight")] == [r["loss"] for r in logged(tmp_path / "by_hand")]
    assert f"global batch 8 ({micro} x {accum} x 1 ranks)" in tight.stderr
    if graphs == "false":  # eager training allocates what the probe did, plus the optimizer's small state
        assert max(r["peak_mem_gib"] for r in logged(tmp_path / "tight")) <= ceiling + 0.002

    none = run_train(*small_run(model, sample_file, tmp_path / "none", *common, "trainer.auto_micro_batch_gib=0.0001"),
                     check=False)
    assert none.returncode != 0 and "Traceback" not in none.stderr
    assert "trainer.auto_micro_batch_gib=0.0001: even a micro-batch of one row peaks at" in none.stderr
    assert "trainer.gradient_checkpointing=true" in none.stderr
    assert not (tmp_path / "none" / "checkpoint-4").exists()
    assert json.loads((tmp_path / "tight" / "checkpoint-4" / "trainer_state.json").read_text())["global_batch"] == 8
