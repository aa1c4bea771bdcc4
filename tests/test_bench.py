"""The benchmark runs end to end on a tiny model on the CPU (its numbers are meaningless there)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO
from ptune import bench


@pytest.mark.slow
def test_bench_smoke_writes_json_and_markdown(tmp_path):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[
            "model_config={model_type: llama, vocab_size: 128, hidden_size: 32, intermediate_size: 64, "
            "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, pad_token_id: 0, eos_token_id: 2}",
            "device=cpu", "prefix_length=4", "max_source_length=6", "max_target_length=6", "num_rows=16",
            "train_settings=[[2,2]]", "steps=1", "warmup_steps=1", "eval_prompts=4", "eval_prompts_at_batch1=1",
            "eval_batches=[1,4]", "eval_new_tokens=3", "eval_check_prompts=4", "decode_steady_batches=[2]", f"out_json={tmp_path / 'b.json'}",
            f"benchmarks_md={tmp_path / 'B.md'}", f"adgen_file={tmp_path / 'absent.json'}",
        ])
    report = bench.run(cfg)
    names = set(report["results"])
    assert {"train peft mb2x2", "train ptune mb2x2", "train ptune mb2x2 +ckpt",
            "eval ptune batch 4 (4 prompts)", "eval peft batch 1 (1 prompts)"} <= names
    for r in report["results"].values():
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0
    assert report["results"]["train ptune mb2x2"]["baseline"] == "train peft mb2x2"
    steady = report["results"]["decode ptune steady batch 2 (seconds a step)"]
    assert steady["tokens_per_s"] == pytest.approx(2 / steady["seconds"]) and steady["setup_and_first_tokens_s"] > 0
    check = report["results"]["eval ptune growing cache batch 4 (4 prompts)"]
    assert check["identical_rows"] == 4 and check["mean_agreeing_tokens"] == 3
    assert json.loads((tmp_path / "b.json").read_text())["results"].keys() == report["results"].keys()
    md = (tmp_path / "B.md").read_text()
    assert "| train ptune mb2x2 |" in md and report["device"] in md
    assert "4 of its rows' greedy tokens identical" in md
