"""`trainer.auto_micro_batch_gib`: the largest micro-batch measured to fit a memory ceiling, and with
`trainer.gradient_checkpointing=auto` the fewest recomputed layers (ptune.fit)."""

from __future__ import annotations

import json
import math
import random
import subprocess

import pytest
import torch

from conftest import REPO, build_tokenizer, logged, run_train, small_run, tiny_config, two_rank_launcher
from ptune.data import BatchPlan
from ptune.fit import (Probe, divisors_descending, fastest, fewest_layers, fit_micro_batch_and_recompute,
                       micro_batch_shapes, outermost)

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


class LinearMemory:
    """Stands in for the GPU prober to test the search alone: a split of `micro` rows with k of 28 layers
    recomputed peaks at 12 + micro * (0.5 - 0.015 * k) GiB (out of memory above 20), and runs at
    1 / micro + ms_per_layer * k ms per 1000 tokens."""

    per_rank_rows = 16
    ms_per_layer = 0.01

    def __init__(self):
        self.layers, self.probed = 0, []

    def recompute(self, k: int) -> None:
        self.layers = k

    def peak(self, micro: int, k: int) -> float:
        gib = 12 + micro * (0.5 - 0.015 * k)
        return gib if gib <= 20 else math.inf

    def worst(self, micro: int, ceiling: float, layers: int = 0) -> Probe:
        assert layers == self.layers, "probed with other layers than the model has"
        self.probed.append((micro, layers))
        return Probe(micro, 16 // micro, (micro, 100), self.peak(micro, layers), layers)

    def timed(self, probe: Probe) -> Probe:
        assert probe.layers == self.layers
        probe.ms_per_ktoken = 1 / probe.micro + self.ms_per_layer * probe.layers
        return probe


@pytest.mark.parametrize("ceiling", [13.0, 14.2, 15.5, 19.0, 12.1])
def test_fewest_recomputed_layers_are_found_in_a_few_probes(ceiling):
    memory = LinearMemory()
    for micro in (16, 8, 4, 2, 1):
        memory.probed.clear()
        found, probes = fewest_layers(memory, micro, ceiling, 28, memory.recompute)
        fits = [k for k in range(29) if memory.peak(micro, k) <= ceiling]
        if not fits:
            assert found is None and probes[-1].layers == 28
            continue
        assert found.layers == fits[0] and found.peak_gib <= ceiling
        assert (fits[0] == 0) or (micro, fits[0] - 1) in memory.probed  # the one below was seen not to fit
        assert len(memory.probed) <= 5, memory.probed


@pytest.mark.parametrize("ms_per_layer, chosen", [(0.005, (16, 25)), (0.01, (4, 0))])
def test_auto_recompute_takes_the_fastest_split_that_fits(ms_per_layer, chosen):
    memory = LinearMemory()
    memory.ms_per_layer = ms_per_layer
    candidates, probes = fit_micro_batch_and_recompute(memory, 14.0, 28, memory.recompute)
    # Under 14 GiB: 16 rows need 25 layers, 8 need 17, 4 fit with none, so 2 and 1 are not tried.
    assert [(c.micro, c.layers) for c in candidates] == [(16, 25), (8, 17), (4, 0)]
    assert {m for m, _ in memory.probed} == {16, 8, 4}
    assert (fastest(candidates).micro, fastest(candidates).layers) == chosen
    assert fastest([]) is None


# Each rank's timed candidates (micro, accumulation, shape, peak, layers, ms per 1000 tokens). Rank 0 fit 8
# rows with no layer recomputed and stopped there; rank 1 (longer rows) needed 3 layers at 8 rows, so it
# also timed 4 rows, which rank 0 never measured.
_RANK_CANDIDATES = """
import json, sys, torch, torch.distributed as dist
from ptune.fit import Probe, agree_across_ranks
dist.init_process_group("gloo")
rank = dist.get_rank()
cases = {
    "one split in common": [[Probe(8, 1, (8, 90), 12.0, 0, 5.0)],
                            [Probe(8, 1, (8, 99), 12.9, 3, 6.0), Probe(4, 2, (4, 99), 11.0, 0, 4.0)]],
    "summed times": [[Probe(8, 1, (8, 90), 12.8, 2, 5.0), Probe(4, 2, (4, 90), 11.0, 0, 4.0)],
                     [Probe(8, 1, (8, 99), 12.9, 3, 6.0), Probe(4, 2, (4, 99), 11.5, 0, 4.5)]],
    "nothing in common": [[], [Probe(8, 1, (8, 99), 12.9, 3, 6.0)]],
}
out = {}
for name, candidates in cases.items():
    c = agree_across_ranks(candidates[rank], 8, 28, torch.device("cpu"))
    out[name] = None if c is None else [c.micro, c.accumulation, c.layers, c.ms_per_ktoken]
# one file per rank: two processes printing to one pipe can interleave their lines
with open(f"{sys.argv[1]}/agreed{rank}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()  # left to interpreter exit, gloo's threads can abort the process
"""


def test_ranks_agree_on_one_split_and_layer_count(tmp_path):
    """Under torchrun each rank searches on its own rows; they train with one split: per split the most layers
    any rank needed, a split only if every rank measured it, and the fastest by summed time."""
    script = tmp_path / "agree.py"
    script.write_text(_RANK_CANDIDATES)
    proc = subprocess.run([*two_rank_launcher(), str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    agreed = [json.loads((tmp_path / f"agreed{rank}.json").read_text()) for rank in (0, 1)]
    assert agreed[0] == agreed[1]
    assert agreed[0] == {"one split in common": [8, 1, 3, 11.0], "summed times": [4, 2, 0, 8.5],
                         "nothing in common": None}


@pytest.mark.parametrize("override, message", [
    ("gradient_checkpointing=auto", "trainer.gradient_checkpointing=auto chooses how many layers to recompute under a memory ceiling: "
             "set trainer.auto_micro_batch_gib too"),
    ("gradient_checkpointing=-1", "trainer.gradient_checkpointing=-1: expected true, false, auto or a number of decoder layers"),
    ("gradient_checkpointing=some", "trainer.gradient_checkpointing='some': expected true, false, auto or a number"),
    ("gradient_checkpointing=2.5", "trainer.gradient_checkpointing=2.5: expected true, false, auto or a number"),
    ("auto_micro_batch_gib=0", "trainer.auto_micro_batch_gib=0.0: expected a memory ceiling in GiB (null keeps the "
                               "micro-batch as set), a number above 0, or null")])
def test_fit_settings_refused_before_anything_loads(override, message):
    from hydra import compose, initialize_config_dir

    import ptune.schema  # noqa: F401 -- registers the config's types
    from conftest import REPO
    from ptune.errors import ConfigError, TrainingError
    from ptune.settings import train as check_settings

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.path=/nonexistent", "data.train_file=/nonexistent.jsonl",
                                          f"trainer.{override}"])
    with pytest.raises((ConfigError, TrainingError)) as refused:
        check_settings(cfg)
    assert message in str(refused.value)


def test_recompute_count_above_the_model_layers_is_refused(tiny_model_dir, sample_file, tmp_path):
    bad = run_train(*small_run(tiny_model_dir("llama"), sample_file, tmp_path / "r", "trainer.gradient_checkpointing=3"),
                    check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert ("trainer.gradient_checkpointing=3: this model has 2 decoder layers; give a number from 0 to 2, true, "
            "false or auto") in bad.stderr


def test_recomputing_some_layers_trains_like_none(tiny_model_dir, sample_file, tmp_path):
    model = tiny_model_dir("glm")
    common = ["prefix.dropout=0", "trainer.max_steps=2"]
    run_train(*small_run(model, sample_file, tmp_path / "none", *common))
    one = run_train(*small_run(model, sample_file, tmp_path / "one", *common, "trainer.gradient_checkpointing=1"))
    assert "1 of 2 layers recomputed in backward" in one.stderr
    assert [r["loss"] for r in logged(tmp_path / "one")] == pytest.approx(
        [r["loss"] for r in logged(tmp_path / "none")], abs=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")
def test_ceiling_needs_a_gpu(tiny_model_dir, sample_file, tmp_path):
    model = tiny_model_dir("llama")
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
    assert f"{micro} x {accum}, 0 of 2 layers recomputed (measured peak" in tight.stderr
    run_train(*small_run(model, sample_file, tmp_path / "by_hand", *common[2:], f"trainer.per_device_batch_size={micro}",
                         f"trainer.gradient_accumulation_steps={accum}"))
    assert [r["loss"] for r in logged(tmp_path / "tight")] == [r["loss"] for r in logged(tmp_path / "by_hand")]
    assert f"global batch 8 ({micro} x {accum} x 1 ranks)" in tight.stderr
    # The probe ran the pass as training does (graphs too) and counted the optimizer's moments.
    assert max(r["peak_mem_gib"] for r in logged(tmp_path / "tight")) <= ceiling

    none = run_train(*small_run(model, sample_file, tmp_path / "none", *common, "trainer.auto_micro_batch_gib=0.0001"),
                     check=False)
    assert none.returncode != 0 and "Traceback" not in none.stderr
    assert "trainer.auto_micro_batch_gib=0.0001: even a micro-batch of one row peaks at" in none.stderr
    assert "trainer.gradient_checkpointing=auto (or true)" in none.stderr
    assert not (tmp_path / "none" / "checkpoint-4").exists()
    assert json.loads((tmp_path / "tight" / "checkpoint-4" / "trainer_state.json").read_text())["global_batch"] == 8


@pytest.fixture(scope="module")
def deep_glm(tmp_path_factory):
    """A tiny GLM of 8 layers, so that recomputing some of them has room between none and all."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("deep-glm")
    config = tiny_config("glm", len(build_tokenizer(out)))
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    return out


@needs_cuda
def test_auto_recompute_fits_the_ceiling_with_the_fewest_layers_and_trains_like_that_setting(deep_glm, sample_file,
                                                                                            tmp_path):
    """Under a ceiling halfway between 8 rows' peak with no layer and with every layer recomputed, 8 rows
    fit with some layers recomputed, and one fewer does not; the fastest timed split is trained with, and
    trains exactly as that split and layer count set by hand do."""
    common = ["trainer.per_device_batch_size=1", "trainer.gradient_accumulation_steps=8", "trainer.max_steps=4",
              "trainer.save_steps=4", "model.dtype=bfloat16"]
    run_train(*small_run(deep_glm, sample_file, tmp_path / "none", *common, "trainer.auto_micro_batch_gib=500"))
    run_train(*small_run(deep_glm, sample_file, tmp_path / "all", *common, "trainer.auto_micro_batch_gib=500",
                         "trainer.gradient_checkpointing=true"))
    none, every = (json.loads((tmp_path / r / "auto_micro_batch.json").read_text()) for r in ("none", "all"))
    assert (none["micro_batch"], none["recomputed_layers"], every["recomputed_layers"]) == (8, 0, 8)
    ceiling = (none["probes"][0]["peak_gib"] + every["probes"][0]["peak_gib"]) / 2

    auto = run_train(*small_run(deep_glm, sample_file, tmp_path / "auto", *common,
                                f"trainer.auto_micro_batch_gib={ceiling!r}", "trainer.gradient_checkpointing=auto"))
    report = json.loads((tmp_path / "auto" / "auto_micro_batch.json").read_text())
    peaks = {(p["micro_batch"], p["recomputed_layers"]): p["peak_gib"] for p in report["probes"]}
    eight = next(t["recomputed_layers"] for t in report["timed"] if t["micro_batch"] == 8)
    assert 0 < eight < 8 and peaks[(8, eight)] <= ceiling < peaks[(8, eight - 1)]
    micro, layers = report["micro_batch"], report["recomputed_layers"]
    assert peaks[(micro, layers)] <= ceiling and (layers == 0 or peaks[(micro, layers - 1)] > ceiling)
    timed = {(t["micro_batch"], t["recomputed_layers"]): t["ms_per_1000_tokens"] for t in report["timed"]}
    assert timed[(micro, layers)] == min(timed.values())
    assert f"{layers} of 8 layers recomputed in backward" in auto.stderr
    assert max(r["peak_mem_gib"] for r in logged(tmp_path / "auto")) <= ceiling

    run_train(*small_run(deep_glm, sample_file, tmp_path / "by_hand", *common[2:],
                         f"trainer.per_device_batch_size={micro}",
                         f"trainer.gradient_accumulation_steps={8 // micro}",
                         f"trainer.gradient_checkpointing={layers}"))
    assert [r["loss"] for r in logged(tmp_path / "auto")] == [r["loss"] for r in logged(tmp_path / "by_hand")]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two GPUs, one per torchrun rank")
def test_auto_recompute_under_torchrun_agrees_and_trains_like_that_setting(deep_glm, sample_file, tmp_path):
    """Two ranks, each probing its own GPU, settle on one split and layer count under a ceiling between none
    and all recomputed, stay under it, and train exactly as that setting given by hand on two ranks does."""
    launcher = [*two_rank_launcher(), "-m"]
    common = ["trainer.per_device_batch_size=1", "trainer.gradient_accumulation_steps=8", "trainer.max_steps=4",
              "trainer.save_steps=4", "model.dtype=bfloat16"]

    def two_ranks(name, *extra):
        return run_train(*small_run(deep_glm, sample_file, tmp_path / name, *common, *extra), launcher=launcher)

    two_ranks("none", "trainer.auto_micro_batch_gib=500")
    two_ranks("all", "trainer.auto_micro_batch_gib=500", "trainer.gradient_checkpointing=true")
    none, every = (json.loads((tmp_path / r / "auto_micro_batch.json").read_text()) for r in ("none", "all"))
    assert (none["micro_batch"], none["recomputed_layers"], every["recomputed_layers"]) == (8, 0, 8)
    ceiling = (none["probes"][0]["peak_gib"] + every["probes"][0]["peak_gib"]) / 2

    auto = two_ranks("auto", f"trainer.auto_micro_batch_gib={ceiling!r}", "trainer.gradient_checkpointing=auto")
    report = json.loads((tmp_path / "auto" / "auto_micro_batch.json").read_text())
    micro, layers = report["micro_batch"], report["recomputed_layers"]
    assert 0 < next(t["recomputed_layers"] for t in report["timed"] if t["micro_batch"] == 8) < 8
    assert f"{layers} of 8 layers recomputed in backward" in auto.stderr
    assert f"global batch 16 ({micro} x {8 // micro} x 2 ranks)" in auto.stderr
    assert max(r["peak_mem_gib"] for r in logged(tmp_path / "auto")) <= ceiling

    run_train(*small_run(deep_glm, sample_file, tmp_path / "by_hand", *common[2:], f"trainer.per_device_batch_size={micro}",
                         f"trainer.gradient_accumulation_steps={8 // micro}", f"trainer.gradient_checkpointing={layers}"),
              launcher=launcher)
    assert [r["loss"] for r in logged(tmp_path / "auto")] == [r["loss"] for r in logged(tmp_path / "by_hand")]
