"""The benchmark runs end to end on a tiny model on the CPU (its numbers are meaningless there)."""

from __future__ import annotations

import json
import logging

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO, SHARED
from ptune import bench, settings
from ptune.errors import ConfigError


@pytest.mark.slow
def test_bench_smoke_writes_json_and_markdown(tmp_path):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[
            "model_config={model_type: llama, vocab_size: 128, hidden_size: 32, intermediate_size: 64, "
            "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, pad_token_id: 0, eos_token_id: 2}",
            "device=cpu", "prefix_length=4", "max_source_length=6", "max_target_length=6", "num_rows=16",
            "train_settings=[[2,2]]", "steps=1", "warmup_steps=1", "eval_prompts=4", "eval_prompts_at_batch1=1",
            "eval_batches=[1,4]", "eval_sampled_batches=[4]", "eval_new_tokens=3", "eval_check_prompts=4",
            "decode_steady_batches=[2]", f"out_json={tmp_path / 'b.json'}",
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
    sampled = report["results"]["eval ptune batch 4 (4 prompts) sampled"]
    assert sampled["baseline"] == "eval ptune batch 4 (4 prompts)" and sampled["tokens_per_s"] > 0
    check = report["results"]["eval ptune growing cache batch 4 (4 prompts)"]
    assert check["identical_rows"] == 4 and check["mean_agreeing_tokens"] == 3
    assert json.loads((tmp_path / "b.json").read_text())["results"].keys() == report["results"].keys()
    md = (tmp_path / "B.md").read_text()
    assert "| train ptune mb2x2 |" in md and report["device"] in md
    assert "4 of its rows' greedy tokens identical" in md


TINY = ("model_config={model_type: llama, vocab_size: 128, hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, pad_token_id: 0, eos_token_id: 2}")


def test_bench_times_widening_a_quantized_base_and_loading_it(tmp_path):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[
            TINY, "device=cpu", "quantization=int4", "quantization_group_size=8", "train_settings=[]",
            "eval_batches=[]", "decode_steady_batches=[]", "eval_check_prompts=0", "compare=[]",
            "load_timing=[false,int4]", f"out_json={tmp_path / 'b.json'}", f"benchmarks_md={tmp_path / 'B.md'}"])
    report = bench.run(cfg)
    for mode in ("not quantized", "int4"):
        load = report["results"][f"load the base from its folder, {mode} (peak GiB above the model built here)"]
        assert load["seconds"] > 0 and "peak_gib" not in load  # device memory is measured on CUDA only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B.md", "b.json"]  # the saved model folder is gone
    widen = report["results"]["widen quantized base, eager"]
    assert widen["layers"] == 2 * 7 and widen["seconds"] > 0  # q, k, v, o, gate, up, down in each layer
    assert "widen quantized base, fused kernel" not in report["results"]  # CUDA only
    assert "| widen quantized base, eager | - | - | - |" in (tmp_path / "B.md").read_text()


def test_bench_refuses_a_load_timing_mode_it_cannot_load():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[TINY, "device=cpu", "load_timing=[false,int3]"])
    with pytest.raises(ConfigError, match=r"^load_timing\[1\]='int3': expected false \(not quantized\), int8 or int4$"):
        settings.bench(cfg)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[TINY, "device=cpu", "load_timing=null"])
    with pytest.raises(ConfigError, match=r"^load_timing=None: expected a list of modes"):
        settings.bench(cfg)


def test_bench_refuses_no_prompts_at_batch1():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[TINY, "device=cpu", "eval_prompts_at_batch1=0"])
    with pytest.raises(ConfigError, match=r"^eval_prompts_at_batch1=0: expected a whole number of at least 1$"):
        settings.bench(cfg)


def test_bench_adgen_rows_compare_against_reference_padding(tmp_path, monkeypatch, caplog):
    # Rows of AdvertiseGen-like lengths without the ChatGLM tokenizer: what is under test is the bench's
    # batching of them (padded to the longest possible row, sorted, grouped), not the tokenizer. cuda_graphs is
    # on (the default), but on the CPU nothing is graphed, so no row may say +graphs.
    def varied_rows(cfg, vocab, seed):
        rows = []
        for i in range(16):
            src, tgt = 3 + i % 4, 2 + (i * 5) % 7
            ids = [10 + (i + j) % 100 for j in range(src + tgt)]
            rows.append({"input_ids": ids, "labels": [bench.IGNORE] * src + ids[src:]})
        return rows

    monkeypatch.setattr(bench, "adgen_rows", varied_rows)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[
            TINY, "device=cpu", "prefix_length=4", "max_source_length=6", "max_target_length=8",
            "train_settings=[]", "adgen_settings=[[4,2]]", "adgen_group_by_length=2", "steps=1",
            "warmup_steps=1", "eval_batches=[]", "decode_steady_batches=[]", "eval_check_prompts=0", "compare=[]",
            f"out_json={tmp_path / 'b.json'}"])
    caplog.set_level(logging.INFO, logger="ptune.bench")
    results = bench.run(cfg)["results"]
    base = "train ptune adgen mb4x2 padded-193"
    others = ["train ptune adgen mb4x2 sorted", "train ptune adgen mb4x2 grouped-2"]
    assert set(results) == {base, *others}
    assert "cuda_graphs: no CUDA on cpu, so the +graphs rows are skipped" in caplog.messages
    for name in others:
        r = results[name]
        assert r["baseline"] == base and r["ratio"] == pytest.approx(r["samples_per_s"] / results[base]["samples_per_s"])


@pytest.mark.slow
def test_bench_table_heading_is_the_command_as_run(tmp_path):
    """The appended table names the overrides it ran with; where its files went is left out."""
    import subprocess
    import sys

    overrides = ["model_config={model_type: llama, vocab_size: 128, hidden_size: 32, intermediate_size: 64, "
                 "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, pad_token_id: 0, eos_token_id: 2}",
                 "device=cpu", "prefix_length=4", "max_source_length=6", "max_target_length=6", "num_rows=16",
                 "train_settings=[[2,2]]", "steps=1", "warmup_steps=1", "gradient_checkpointing=false", "compare=[]",
                 "eval_batches=[]", "decode_steady_batches=[]", "eval_check_prompts=0", "adgen_settings=[]"]
    proc = subprocess.run([sys.executable, "-m", "ptune.bench", *overrides, f"out_json={tmp_path / 'b.json'}",
                           f"benchmarks_md={tmp_path / 'B.md'}", f"hydra.run.dir={tmp_path / 'h'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heading = next(line for line in (tmp_path / "B.md").read_text().splitlines() if line.startswith("## "))
    assert heading.endswith("`python -m ptune.bench " + " ".join(overrides) + "`"), heading
    assert str(tmp_path) not in heading


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "chatglm" / "tokenizer.model").is_file(), reason="needs ../shared's ChatGLM tokenizer")
def test_adgen_lengths_are_read_like_training_data(tmp_path):
    """The real-lengths rows come from the data reader the trainer uses: a JSON array works, and a row whose
    text holds U+2028 (JSON leaves it unescaped) stays one row instead of two broken lines."""
    rows = [{"content": "类型#裤*版型#宽松", "summary": "宽松的\u2028阔腿裤"}, {"content": "类型#上衣", "summary": "短款上衣"}]
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[f"chatglm_tokenizer_dir={SHARED / 'chatglm'}", "num_rows=8"])
    got = []
    for path in (lines, array):
        cfg.adgen_file = str(path)
        got.append([(len(r["input_ids"]), sum(x != -100 for x in r["labels"])) for r in bench.adgen_rows(cfg, 100, 0)])
    assert len(got[0]) == 2 and got[0] == got[1]
    assert got[0][0][1] > got[0][1][1]  # the U+2028 summary is the longer target, not cut at the separator


def test_bench_training_settings_reach_ptune_and_the_peft_baseline(tmp_path, monkeypatch):
    """lr, weight_decay and max_grad_norm are one setting for both sides, and the learning rate is constant on both,
    so the comparison stays like for like; prefix_dropout, pad_to_multiple_of and decode_steady_tokens come from the
    config, not from the code. A steady-decoding batch above eval_prompts is named by the batch that ran."""
    import transformers

    seen = {"steps": set(), "pads": set(), "dropouts": set(), "new_tokens": []}
    step, collate, encoder, generate = bench.optimizer_step, bench.collate, bench.PrefixEncoder, bench.generate
    arguments = transformers.TrainingArguments

    def spy_step(*args, max_grad_norm, **kw):
        group = args[4].param_groups[0]
        seen["steps"].add((group["lr"], group["weight_decay"], max_grad_norm))
        return step(*args, max_grad_norm=max_grad_norm, **kw)

    def spy_collate(rows, pad_token_id, *multiple):
        seen["pads"].update(multiple)
        return collate(rows, pad_token_id, *multiple)

    def spy_encoder(spec, **kw):
        seen["dropouts"].add(kw.get("dropout"))
        return encoder(spec, **kw)

    def spy_generate(*args, max_new_tokens, **kw):
        seen["new_tokens"].append(max_new_tokens)
        return generate(*args, max_new_tokens=max_new_tokens, **kw)

    def spy_arguments(**kw):
        args = arguments(**kw)
        seen["peft"] = (args.learning_rate, args.weight_decay, args.max_grad_norm, args.lr_scheduler_type)
        return args

    monkeypatch.setattr(bench, "optimizer_step", spy_step)
    monkeypatch.setattr(bench, "collate", spy_collate)
    monkeypatch.setattr(bench, "PrefixEncoder", spy_encoder)
    monkeypatch.setattr(bench, "generate", spy_generate)
    monkeypatch.setattr(transformers, "TrainingArguments", spy_arguments)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[
            TINY, "device=cpu", "prefix_length=4", "max_source_length=5", "max_target_length=6", "num_rows=8",
            "train_settings=[[2,1]]", "steps=1", "warmup_steps=1", "gradient_checkpointing=false",
            "cuda_graphs=false", "adgen_settings=[]", "eval_prompts=2", "eval_batches=[]",
            "decode_steady_batches=[2,3]", "eval_check_prompts=0", "lr=0.03", "weight_decay=0.01",
            "max_grad_norm=0.5", "prefix_dropout=0.2", "pad_to_multiple_of=4", "decode_steady_tokens=[2,5]",
            f"out_json={tmp_path / 'b.json'}"])
    results = bench.run(cfg)["results"]
    assert seen["steps"] == {(0.03, 0.01, 0.5)} and seen["peft"] == (0.03, 0.01, 0.5, "constant")
    assert seen["pads"] == {4} and seen["dropouts"] == {0.2, None}  # None: the decoding prefix, not training's
    assert seen["new_tokens"] == [2, 2, 5]  # warm-up, then the two timed lengths; batch 3 ran as batch 2, once
    steady = [name for name in results if name.startswith("decode")]
    assert steady == ["decode ptune steady batch 2 (seconds a step)"]
    assert results[steady[0]]["tokens_per_s"] == pytest.approx(2 / results[steady[0]]["seconds"])
