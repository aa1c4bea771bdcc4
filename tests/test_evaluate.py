"""ptune.evaluate on tiny real models: batch-size invariance, repeatability, seeded sampling, clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ptune.evaluate as ev
from conftest import REPO, build_tokenizer, device_memory_cap, tiny_config, train_tiny_run
from ptune.checkpoint import CheckpointError
from ptune.errors import ModelError
from ptune.models import load_for_inference

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SCORES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


@pytest.fixture(scope="module")
def ckpt(trained_checkpoint) -> Path:
    return trained_checkpoint


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("evaluate", overrides=["device=cpu", *overrides])


def generation(name: str = "greedy", **changes):
    gen = OmegaConf.load(REPO / "conf" / "generation" / f"{name}.yaml")
    return OmegaConf.merge(gen, changes)


def test_greedy_outputs_do_not_depend_on_batch_size(ckpt, sample_file):
    model, tok, config = load_for_inference(ckpt, OmegaConf.create({"dtype": "float32"}), "cpu")
    # A random tiny model's logits are nearly flat: two tokens within float noise of each other could let
    # padding flip an argmax on some platform. Sharpen them (it passes without this here too); a real
    # batching bug (mask, positions, prefix broadcast) moves hidden states far more and still shows.
    with torch.no_grad():
        model.base.get_output_embeddings().weight.mul_(25.0)
    evalset = ev.build_eval_set(ev.eval_examples(sample_file, config["data"]), tok, config["data"],
                                config["model"]["template"], limit=21)
    lengths = sorted({len(p) for p in evalset.prompts})
    assert len(lengths) >= 5 and lengths[-1] - lengths[0] >= 8, lengths  # left padding is exercised
    gen = generation(max_new_tokens=12)
    one, stats = ev.predict(model, tok, evalset.prompts, gen, 1, CPU, progress=False)
    assert stats["batch_size"] == 1
    for size in (16, 5):
        texts, _ = ev.predict(model, tok, evalset.prompts, gen, size, CPU, progress=False)
        assert texts == one, f"batch size {size}"
    assert len(set(one)) > 1 and all(t for t in one)


def test_sampled_predictions_do_not_depend_on_the_batch(ckpt, sample_file, monkeypatch):
    """Each row samples from its own stream (the seed and its place among the eval rows): the same replies at any
    batch size, and where a batch that ran out of memory part-way is generated again in smaller batches."""
    model, tok, config = load_for_inference(ckpt, OmegaConf.create({"dtype": "float32"}), "cpu")
    prompts = ev.build_eval_set(ev.eval_examples(sample_file, config["data"]), tok, config["data"],
                                config["model"]["template"], limit=12).prompts
    gen = generation("reference_sampling", max_new_tokens=6)
    one, _ = ev.predict(model, tok, prompts, gen, 1, CPU, progress=False)
    for size in (12, 5):
        assert ev.predict(model, tok, prompts, gen, size, CPU, progress=False)[0] == one, f"batch size {size}"
    other, _ = ev.predict(model, tok, prompts, generation("reference_sampling", max_new_tokens=6, seed=7), 12, CPU,
                          progress=False)
    assert other != one and len(set(one)) > 1
    real, calls = ev.generate, []

    def generate(model, input_ids, *args, **kwargs):
        calls.append(len(input_ids))
        steps = []

        def fail_at_third_step(column):
            steps.append(column)
            if len(steps) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")

        # batches of 12 and 6 run out of memory after drawing two tokens
        return real(model, input_ids, *args, on_token=fail_at_third_step if len(input_ids) > 4 else None, **kwargs)

    monkeypatch.setattr(ev, "generate", generate)
    assert ev.predict(model, tok, prompts, gen, "auto", CPU, progress=False)[0] == one
    assert calls[:3] == [12, 6, 3] and sum(calls[2:]) == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA allocator's own out-of-memory error")
def test_batches_past_the_allocators_limit_are_halved_and_predict_what_small_batches_do(tiny_model_dir):
    """Not injected: auto sizes the batch from the free memory, but the allocator is held to 96 MiB more than the
    model, so the first batches (their KV cache alone 512 MiB and 256 MiB) run out and are halved."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ptune.errors import ConfigError
    from ptune.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir("llama"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=len(tok), pad_token_id=0, eos_token_id=3)).to("cuda").eval()
    with torch.no_grad():  # sharper logits: a batch of another size must not flip a near-tie
        model.get_output_embeddings().weight.mul_(25.0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, len(tok), (int(n),), generator=gen).tolist()
               for n in torch.randint(20, 64, (256,), generator=gen)]
    config = generation(max_new_tokens=64)
    expected, _ = ev.predict(model, tok, prompts, config, 32, torch.device("cuda"), progress=False)
    with device_memory_cap(96 * 2**20):
        texts, stats = ev.predict(model, tok, prompts, config, "auto", torch.device("cuda"), progress=False)
        assert stats["batch_size"] < 128
        with pytest.raises(ConfigError, match=r"^batch_size=256: out of memory generating a batch of 256 prompts"):
            ev.predict(model, tok, prompts, config, 256, torch.device("cuda"), progress=False)
    assert texts == expected
    # after the failures, the device's memory is the allocator's to give again
    again, _ = ev.predict(model, tok, prompts, config, 256, torch.device("cuda"), progress=False)
    assert again == expected


def test_a_batch_out_of_memory_is_halved_under_auto_and_refused_where_batch_size_was_set(ckpt, sample_file,
                                                                                          monkeypatch, caplog):
    """What the CUDA allocator raises, injected where generate would raise it: batch_size=auto guesses from the
    free memory and can be wrong, so it goes on with half the rows; a batch_size the user set is theirs to lower."""
    from ptune.errors import ConfigError

    model, tok, config = load_for_inference(ckpt, OmegaConf.create({"dtype": "float32"}), "cpu")
    with torch.no_grad():  # as in the batch-size test above: no near-ties for padding to flip
        model.base.get_output_embeddings().weight.mul_(25.0)
    prompts = ev.build_eval_set(ev.eval_examples(sample_file, config["data"]), tok, config["data"],
                                config["model"]["template"], limit=21).prompts
    gen = generation(max_new_tokens=6)
    expected, _ = ev.predict(model, tok, prompts, gen, 4, CPU, progress=False)
    real, sizes, fits = ev.generate, [], [5]

    def generate(model, input_ids, *args, **kwargs):
        sizes.append(len(input_ids))
        if len(input_ids) > fits[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total "
                                         "capacity of 23.55 GiB\nOf the allocated memory ...")
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(ev, "generate", generate)
    with caplog.at_level("WARNING", logger="ptune.evaluate"):
        texts, stats = ev.predict(model, tok, prompts, gen, "auto", CPU, progress=False)
    assert sizes == [16, 8, 4, 4, 4, 4, 4, 1]  # auto is 16 rows on the CPU; no row is generated twice
    assert texts == expected and stats["batch_size"] == 4
    longest = max(map(len, prompts))
    assert [r.getMessage() for r in caplog.records] == [
        f"out of memory generating a batch of {n} prompts of up to {longest} tokens with 6 new tokens; going on "
        f"with batches of {n // 2}" for n in (16, 8)]

    with pytest.raises(ConfigError) as e:
        ev.predict(model, tok, prompts, gen, 8, CPU, progress=False)
    assert str(e.value) == (f"batch_size=8: out of memory generating a batch of 8 prompts of up to {longest} tokens "
                            "with 6 new tokens (CUDA out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total "
                            "capacity of 23.55 GiB); lower batch_size, or batch_size=auto to size it to the free "
                            "memory")
    fits[0] = 0
    for batch_size in ("auto", 1):  # one row that does not fit: no batch size would help
        with pytest.raises(ConfigError, match=r"^out of memory generating a batch of 1 prompt of up to \d+ tokens "
                                              r"with 6 new tokens \(CUDA .*\); lower generation.max_new_tokens or "
                                              r"data.max_source_length, or free the device's memory$"):
            ev.predict(model, tok, prompts[:3], gen, batch_size, CPU, progress=False)


def test_an_extra_stop_id_the_model_cannot_produce_is_refused(ckpt):
    from ptune.errors import ConfigError

    model, tok, _ = load_for_inference(ckpt, OmegaConf.create({"dtype": "float32"}), "cpu")
    size = model.base.get_output_embeddings().weight.shape[0]
    with pytest.raises(ConfigError, match=rf"generation.extra_eos_token_ids=\[5, {size}\]: {size} is not a token id "
                                          rf"of this model, whose output layer has {size} \(ids 0 to {size - 1}\)"):
        ev.predict(model, tok, [[5, 6]], generation(extra_eos_token_ids=[5, size]), 1, CPU, progress=False)
    texts, _ = ev.predict(model, tok, [[5, 6]], generation(extra_eos_token_ids=[5, size - 1], max_new_tokens=2), 1,
                          CPU, progress=False)
    assert len(texts) == 1


def _scores(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items() if k not in ("generation",)}


def test_evaluate_command_is_repeatable(ckpt, sample_file, tmp_path):
    work = tmp_path / "ckpt"
    shutil.copytree(ckpt, work)
    common = [sys.executable, "-m", "ptune.evaluate", f"data.eval_file={sample_file}", "generation.max_new_tokens=8",
              "limit=12", "device=cpu"]
    # Two runs at once (two cores): one into the default <checkpoint>/eval, one elsewhere.
    outs = [work / "eval", tmp_path / "again"]
    procs = [subprocess.Popen(common + [f"checkpoint={work}"] + extra, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ})
             for extra in ([], [f"output_dir={outs[1]}"])]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-4000:]
        assert "| name | rouge-1 | rouge-2 | rouge-l | bleu-4 |" in stdout
        assert "Loading weights" not in stderr  # transformers' bar is carriage returns in a pipe
    a, b = (_scores(o / "metrics.json") for o in outs)
    assert a == b and a["num_samples"] == 12 and all(isinstance(a[k], float) for k in SCORES)
    assert a["checkpoint"] == str(work) and a["eval_file"] == str(sample_file)
    preds = [(o / "generated_predictions.jsonl").read_text(encoding="utf-8") for o in outs]
    assert preds[0] == preds[1]
    rows = [json.loads(line) for line in preds[0].splitlines()]
    assert len(rows) == 12 and all(set(r) == {"prompt", "label", "predict"} for r in rows)
    assert all(isinstance(r["predict"], str) and r["label"] for r in rows)


def test_a_checkpoint_saved_again_while_it_is_evaluated_gets_no_scores(ckpt, sample_file, tmp_path, monkeypatch):
    """The scores would be the old prefix's, written beside the new one (and reused by a sweep as the new one's)."""
    import shutil

    copy = shutil.copytree(ckpt, tmp_path / "run" / ckpt.name)
    real = ev.predict

    def predict(*a, **k):
        out = real(*a, **k)
        prefix = copy / "prefix.safetensors"
        prefix.write_bytes(prefix.read_bytes())  # the same bytes: no change, no refusal
        return out
    monkeypatch.setattr(ev, "predict", predict)
    cfg = compose(f"checkpoint={copy}", f"data.eval_file={sample_file}", "limit=3", "generation.max_new_tokens=4")
    assert ev.evaluate(cfg) and json.loads((copy / "eval" / "metrics.json").read_text())["prefix_sha256"] == (
        hashlib.sha256((copy / "prefix.safetensors").read_bytes()).hexdigest())
    shutil.rmtree(copy / "eval")

    def predict_then_resave(*a, **k):
        out = real(*a, **k)
        from safetensors.torch import load_file, save_file
        weights = load_file(str(copy / "prefix.safetensors"))
        save_file({k: v + 1 for k, v in weights.items()}, str(copy / "prefix.safetensors"))
        return out
    monkeypatch.setattr(ev, "predict", predict_then_resave)
    with pytest.raises(CheckpointError, match="its prefix changed while it was being scored"):
        ev.evaluate(cfg)
    assert not (copy / "eval" / "metrics.json").exists()


def test_a_checkpoint_pruned_while_the_base_loads_is_still_scored(ckpt, sample_file, tmp_path, monkeypatch):
    """checkpoint=<run> takes the newest checkpoint; a run still training with keep_last can remove it during the
    base's minutes of loading. Its prefix is read first, so it is scored; its eval/ is not made again."""
    import shutil

    import ptune.models

    run = tmp_path / "run"
    shutil.copytree(ckpt, run / ckpt.name)
    real = ptune.models.load_base

    def load_base(*a, **k):
        shutil.rmtree(run / ckpt.name)  # pruned meanwhile
        return real(*a, **k)
    monkeypatch.setattr(ptune.models, "load_base", load_base)
    common = [f"checkpoint={run}", f"data.eval_file={sample_file}", "limit=3", "generation.max_new_tokens=4"]
    assert ev.evaluate(compose(*common, f"output_dir={tmp_path / 'scores'}"))
    assert (tmp_path / "scores" / "metrics.json").is_file()
    shutil.copytree(ckpt, run / ckpt.name)
    with pytest.raises(CheckpointError, match="removed while it was being scored .* give output_dir= to keep"):
        ev.evaluate(compose(*common))
    assert not (run / ckpt.name).exists()


def test_seeded_sampling_is_repeatable(ckpt, sample_file, tmp_path):
    def run(name: str, *extra: str) -> list[str]:
        ev.evaluate(compose(f"checkpoint={ckpt}", f"data.eval_file={sample_file}", "generation=reference_sampling",
                            "generation.max_new_tokens=12", "limit=6", f"output_dir={tmp_path / name}", *extra))
        return [json.loads(line)["predict"] for line in (tmp_path / name / "generated_predictions.jsonl").open()]

    first = run("a")
    assert run("b") == first
    other = run("c", "generation.seed=7")
    assert other != first
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["generation"]["do_sample"] is True


def _save_model(cfg, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    build_tokenizer(out)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 3}, "num_layers: checkpoint 2 vs base 3"),
    ({"num_key_value_heads": 4}, "num_kv_heads: checkpoint 2 vs base 4"),
])
def test_prefix_that_does_not_fit_the_base_names_both_sides(ckpt, tmp_path, change, message):
    cfg = tiny_config("llama", json.loads((Path(ckpt) / "prefix_config.json").read_text())["base"]["vocab_size"])
    for k, v in change.items():
        setattr(cfg, k, v)
    other = _save_model(cfg, tmp_path / "other")
    with pytest.raises(CheckpointError) as err:
        load_for_inference(ckpt, OmegaConf.create({"path": str(other), "dtype": "float32"}), "cpu")
    assert message in str(err.value) and "prefix does not fit the base model" in str(err.value)


def _edit_config(ckpt: Path, manifest: bool = True, base: dict | None = None, **prefix) -> None:
    config = json.loads((ckpt / "prefix_config.json").read_text())
    config["prefix"].update(prefix)
    config["base"].update(base or {})
    (ckpt / "prefix_config.json").write_text(json.dumps(config))
    if manifest:
        listed = json.loads((ckpt / "manifest.json").read_text())
        data = (ckpt / "prefix_config.json").read_bytes()
        listed["prefix_config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (ckpt / "manifest.json").write_text(json.dumps(listed))


@pytest.mark.parametrize("edit, message", [
    ({"length": 6}, r"embedding.weight has shape \(4, 64\), the prefix spec needs \(6, 64\)"),
    ({"projection": True, "projection_hidden_size": 16},
     r"prefix tensors \['embedding.weight'\] do not match the prefix spec \['embedding.weight', 'trans.0.bias'"),
])
def test_prefix_weights_that_do_not_match_their_config(ckpt, tmp_path, edit, message):
    work = shutil.copytree(ckpt, tmp_path / "ckpt")
    _edit_config(work, **edit)
    with pytest.raises(CheckpointError, match=message):
        load_for_inference(work, OmegaConf.create({"dtype": "float32"}), "cpu")
    # The same edit without updating the manifest is caught as a changed file.
    stale = shutil.copytree(ckpt, tmp_path / "stale")
    _edit_config(stale, manifest=False, **edit)
    with pytest.raises(CheckpointError, match="prefix_config.json: .* manifest"):
        load_for_inference(stale, OmegaConf.create({"dtype": "float32"}), "cpu")


def test_empty_predictions_are_scored_and_counted(ckpt, tiny_model_dir, sample_file, tmp_path):
    metrics = ev.compute_metrics(["", "  ", "这条裙子很好看"], ["这条包臀裙很好看", "白色的衬衫", "这条裙子很好看"])
    assert metrics["num_empty_predictions"] == 2 and metrics["num_samples"] == 3
    assert 0 < metrics["rouge-l"] < 100
    # End to end: every token a stop token, so each reply stops before its first token; the stop token
    # (an ordinary character here, not a special one) is not part of the prediction.
    out = tmp_path / "empty"
    every = list(range(json.loads((tiny_model_dir("llama") / "config.json").read_text())["vocab_size"]))
    result = ev.evaluate(compose(f"checkpoint={ckpt}", f"data.eval_file={sample_file}", "limit=4",
                                 f"generation.extra_eos_token_ids={every}", f"output_dir={out}"))
    assert result["num_empty_predictions"] == 4 and result["rouge-l"] == 0.0
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").open()]
    assert [r["predict"] for r in rows] == [""] * 4


def test_base_model_alone_is_scored_and_recorded_as_no_checkpoint(tiny_model_dir, sample_file, tmp_path):
    out = tmp_path / "eval-base"
    cfg = compose(f"model.path={tiny_model_dir('llama')}", "model.template=plain", f"data.eval_file={sample_file}",
                  "data.prompt_column=content", "data.response_column=summary", "data.max_source_length=32",
                  "data.max_target_length=16", "data.truncate_source_from=right", "generation.max_new_tokens=4",
                  "limit=3", f"output_dir={out}")
    metrics = ev.evaluate(cfg)
    written = json.loads((out / "metrics.json").read_text())
    assert written["checkpoint"] is None and written["num_samples"] == 3
    assert all(written[k] == metrics[k] for k in SCORES)
    assert len((out / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 3


def test_base_model_alone_without_the_settings_a_checkpoint_records_is_refused_before_loading(tmp_path, monkeypatch):
    from ptune import models

    monkeypatch.setattr(models, "load_for_inference", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = compose("model.path=/any/model", "data.eval_file=" + str(ev.__file__), "data.prompt_column=content")
    with pytest.raises(ev.ConfigError) as e:
        ev.evaluate(cfg)
    assert ("pass data.response_column=..., data.max_source_length=..., data.max_target_length=..., "
            "model.template=...") in str(e.value)


def test_a_stopped_write_never_leaves_new_predictions_under_old_scores(ckpt, sample_file, tmp_path, monkeypatch):
    """The predictions file replaces the old one whole, and the old scores are gone before it does: a
    writer stopped between the two files leaves predictions without scores, which a sweep scores again."""
    out = tmp_path / "eval"
    cfg = compose(f"checkpoint={ckpt}", f"data.eval_file={sample_file}", "generation.max_new_tokens=4", "limit=3",
                  f"output_dir={out}")
    ev.evaluate(cfg)
    before = (out / "generated_predictions.jsonl").read_bytes()
    real = ev.write_text_atomic

    def stop_before_metrics(path, text):
        if path.name == "metrics.json":
            raise KeyboardInterrupt
        real(path, text)
        assert path.name == "generated_predictions.jsonl" and not (out / "metrics.json").exists()

    monkeypatch.setattr(ev, "write_text_atomic", stop_before_metrics)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(compose(f"checkpoint={ckpt}", f"data.eval_file={sample_file}", "generation.max_new_tokens=6",
                            "limit=3", f"output_dir={out}"))
    assert not (out / "metrics.json").exists() and (out / "generated_predictions.jsonl").read_bytes() != before
    assert sorted(p.name for p in out.iterdir()) == ["generated_predictions.jsonl"]  # no temporary file left


def test_references_are_cut_as_the_reference_script_cuts_them(tmp_path):
    """ChatGLM2's main.py: tokenizer(text_target=..., max_length=T, truncation=True), special tokens and all,
    then decoded without them: T less the tokenizer's special tokens of text ([gMASK] sop for ChatGLM)."""
    from tokenizers import processors

    tok = build_tokenizer(tmp_path / "tok")
    # two special tokens before the text, as ChatGLM's [gMASK] sop
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> <s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    specials = len(tok("", add_special_tokens=True)["input_ids"])
    assert specials == 2
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"content": "q", "summary": "abcdefghijklmnop"}) + "\n", encoding="utf-8")
    data_cfg = {"prompt_column": "content", "response_column": "summary", "history_column": None,
                "max_source_length": 6, "max_target_length": 8, "truncate_source_from": "right"}
    (label,) = ev.build_eval_set(ev.eval_examples(data, data_cfg), tok, data_cfg, "chatglm2").labels
    reference = tok.decode(tok("abcdefghijklmnop", max_length=8, truncation=True)["input_ids"], skip_special_tokens=True)
    assert label == reference == "abcdefghijklmnop"[: 8 - specials]
    # other prompt formats have no reference script: their references keep what training keeps
    (label,) = ev.build_eval_set(ev.eval_examples(data, data_cfg), tok, data_cfg, "plain").labels
    assert label == "abcdefghijklmnop"[:8]


def test_references_are_decoded_as_chat_and_serve_decode_replies(tmp_path):
    """With a tokenizer saved with clean_up_tokenization_spaces on, decoding rewrote 'S , M' to 'S, M' in the
    scored texts but not in what chat and serve answer: one rule (ptune.data.decode_text) for both now."""
    from ptune.data import decode_reply, text_ids

    tok = build_tokenizer(tmp_path / "tok")
    tok.clean_up_tokenization_spaces = True
    reference = "Size S , M . Don 't"
    assert tok.decode(text_ids(tok, reference), skip_special_tokens=True) != reference  # what the cleanup does
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"content": "q", "summary": reference}) + "\n", encoding="utf-8")
    data_cfg = {"prompt_column": "content", "response_column": "summary", "history_column": None,
                "max_source_length": 6, "max_target_length": 64, "truncate_source_from": "right"}
    (label,) = ev.build_eval_set(ev.eval_examples(data, data_cfg), tok, data_cfg, "plain").labels
    assert label == decode_reply(tok, text_ids(tok, reference)) == reference


@pytest.mark.parametrize("side", ["left", "right"])
def test_eval_prompts_are_cut_as_training_cuts_them(tmp_path, side):
    """Evaluate builds its prompts with the training code: left truncation keeps the chat template's user
    and assistant headers and cuts the text between them, right truncation keeps the first ids."""
    from ptune.data import Encoding, encode_example, prompt_ids

    tok = build_tokenizer(tmp_path / "tok")
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"content": "abcdefghij", "summary": "xy"}) + "\n", encoding="utf-8")
    data_cfg = {"prompt_column": "content", "response_column": "summary", "history_column": None,
                "max_source_length": 6, "max_target_length": 8, "truncate_source_from": side}
    (prompt,) = ev.build_eval_set(ev.eval_examples(data, data_cfg), tok, data_cfg, "chat_template").prompts
    trained = encode_example(tok, Encoding("chat_template", 6, 8, side), "abcdefghij", "xy", [])
    assert prompt == trained["input_ids"][:6]
    full = prompt_ids(tok, "abcdefghij", [], "chat_template")
    want = full[:6] if side == "right" else full[:1] + full[-5:]
    assert prompt == want
    assert tok.convert_ids_to_tokens(prompt)[-1] == ("<|assistant|>" if side == "left" else "e")


def test_a_reference_cut_part_way_through_a_character_leaves_that_character_out(tmp_path):
    """A byte-level tokenizer's cut at max_target_length may fall inside a Chinese character (three tokens each
    here): the reference scored is the text before it, never a U+FFFD the data does not hold."""
    from test_chat import byte_level_tokenizer

    tok = byte_level_tokenizer()
    data = tmp_path / "dev.jsonl"
    rows = [{"content": "a", "summary": "连衣裙"}, {"content": "b", "summary": "ab\ufffd"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    data_cfg = {"prompt_column": "content", "response_column": "summary", "history_column": None,
                "max_source_length": 8, "max_target_length": 5, "truncate_source_from": "right"}
    labels = ev.build_eval_set(ev.eval_examples(data, data_cfg), tok, data_cfg, "plain").labels
    assert labels == ["连", "ab\ufffd"]  # 5 of 9 bytes: one whole character; a text's own U+FFFD stays


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_generation_is_one_line_with_the_signals_status_and_writes_nothing(ckpt, sample_file, tmp_path,
                                                                                        sig):
    if sig == signal.SIGINT and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this process (started in the background), so in evaluate it starts too")
    evalset = tmp_path / "dev.jsonl"  # long enough to be mid-generation when the signal comes
    evalset.write_text(sample_file.read_text(encoding="utf-8") * 8, encoding="utf-8")
    out = tmp_path / "eval"
    proc = subprocess.Popen([sys.executable, "-m", "ptune.evaluate", f"checkpoint={ckpt}", f"data.eval_file={evalset}",
                             "limit=null", "generation.max_new_tokens=64", "device=cpu", f"output_dir={out}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        seen = []
        for line in proc.stderr:  # the bar's first line: loaded, generating
            seen.append(line)
            if "generate:" in line:
                break
        proc.send_signal(sig)
        stderr = "".join(seen) + proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == "evaluate interrupted" + (" (SIGTERM)" if sig == signal.SIGTERM else "")
    assert not out.exists()


def test_prompts_and_replies_past_the_models_positions_are_refused_before_generating(tiny_model_dir, sample_file,
                                                                                     tmp_path):
    """GPT-2's learned position table (n_positions=512 here) has no row past its end: generating there failed
    with an IndexError mid-run. The longest prompt plus generation.max_new_tokens must fit, as in chat."""
    out = tmp_path / "eval"
    base = [f"model.path={tiny_model_dir('gpt2')}", "model.template=plain", f"data.eval_file={sample_file}",
            "data.prompt_column=content", "data.response_column=summary", "data.max_source_length=32",
            "data.max_target_length=16", "limit=3", f"output_dir={out}"]
    with pytest.raises(ev.ConfigError) as err:
        ev.evaluate(compose(*base, "generation.max_new_tokens=500"))
    longest = int(re.search(r"has (\d+) tokens", str(err.value)).group(1))
    assert 20 < longest <= 32
    assert str(err.value) == (
        f"generation.max_new_tokens=500: the longest of the 3 eval prompts has {longest} tokens, which with the "
        f"reply need {longest + 500} positions; the model has 512 (n_positions): expected "
        f"generation.max_new_tokens of at most {512 - longest}, or data.max_source_length of at most 12")
    assert not out.exists()
    assert ev.evaluate(compose(*base, f"generation.max_new_tokens={512 - longest}"))["num_samples"] == 3


def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(ckpt, sample_file, tmp_path, monkeypatch):
    """Results are written after the whole eval set is generated: a folder that cannot take them failed then,
    with a traceback, and the generation was lost. It is refused first, in one line that says what to pass."""
    from ptune import models

    monkeypatch.setattr(models, "load_for_inference", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(ev, "load_for_inference", lambda *a, **k: pytest.fail("loaded a model"))
    common = (f"checkpoint={ckpt}", f"data.eval_file={sample_file}", "limit=2", "generation.max_new_tokens=4")
    with pytest.raises(ev.ConfigError) as err:
        ev.evaluate(compose(*common, f"output_dir={sample_file}/eval"))
    assert str(err.value) == (f"output_dir={sample_file}/eval: cannot write there, {sample_file} is not a folder; "
                              "expected a folder that can be written")
    work = shutil.copytree(ckpt, tmp_path / "read-only")  # as root, permissions would not stop a write
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != work and real_access(p, mode, **k))
    with pytest.raises(ev.ConfigError) as err:
        ev.evaluate(compose(*common[1:], f"checkpoint={work}"))
    assert str(err.value) == (f"cannot write the results to {work}/eval: {work} is read-only; "
                              "pass output_dir=<a folder that can be written>")
    assert not (work / "eval").exists()


def test_a_run_folder_is_scored_at_its_newest_checkpoint_as_chat_and_serve_take_it(ckpt, sample_file, tmp_path):
    """checkpoint=<run folder> failed with "prefix_config.json: missing; is <run> a ptune checkpoint?" although
    chat and serve take a run folder for its newest complete checkpoint."""
    out = tmp_path / "eval"
    metrics = ev.evaluate(compose(f"checkpoint={ckpt.parent}", f"data.eval_file={sample_file}", "limit=2",
                                  "generation.max_new_tokens=4", f"output_dir={out}"))
    written = json.loads((out / "metrics.json").read_text())
    assert written["checkpoint"] == str(ckpt) and written["num_samples"] == metrics["num_samples"] == 2
    with pytest.raises(CheckpointError, match=rf"^checkpoint={tmp_path}: expected a checkpoint folder"):
        ev.evaluate(compose(f"checkpoint={tmp_path}", f"data.eval_file={sample_file}"))


def test_a_checkpoint_records_its_base_folder_as_an_absolute_path(tiny_model_dir, sample_file, tmp_path, monkeypatch):
    """model.path given relative to where training ran still finds the base from any other folder; a checkpoint
    that recorded a relative path (as ptune did before) names where it looked when the folder is not there."""
    model_dir = tiny_model_dir("llama")
    relative = os.path.relpath(model_dir, REPO)  # the trainer's command runs in REPO
    ckpt = train_tiny_run(Path(relative), sample_file, tmp_path / "run")
    recorded = json.loads((ckpt / "prefix_config.json").read_text())["base"]["path"]
    assert recorded == str(model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    load_for_inference(ckpt, None, "cpu")

    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    _edit_config(old, base={"path": relative})
    with pytest.raises(ModelError, match=re.escape(f"{old}: its base model folder {relative} (recorded when it was "
                                                   f"trained, relative to the folder training ran in, not "
                                                   f"{tmp_path}) is not there; pass model.path=")):
        load_for_inference(old, None, "cpu")
    load_for_inference(old, OmegaConf.create({"path": str(model_dir)}), "cpu")  # the way round it the error names
