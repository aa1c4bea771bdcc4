"""Score a checkpoint: `python -m ptune.evaluate checkpoint=outputs/<run>/checkpoint-N [data.eval_file=...]`
(`checkpoint=outputs/<run>`: its newest complete checkpoint).

Generates for every eval row in large left-padded batches (longest prompts first, so the batch size
that fits the first batch fits all), writes `generated_predictions.jsonl` and `metrics.json`, and prints
the ROUGE/BLEU table.
"""

from __future__ import annotations

# Run as a command, the config is composed (and --help or a setting Hydra refuses answered) before the
# imports below take their seconds; ptune.command then imports this module again and calls main(cfg).
if __name__ == "__main__":
    from ptune.command import run_command

    run_command("evaluate")

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ptune import checkpoint as ckpt_io
from ptune import settings
from ptune.chatglm.ptuning import WEIGHT_FILES
from ptune.settings import resolve_device
from ptune.data import (Columns, decode_reply, decode_text, fit_prompt, left_pad, load_examples, prompt_ids,
                        report_cut_prompts, text_ids)
from ptune.generate import generate, release_decoding_memory, stop_token_ids
from ptune.errors import CheckpointError, ConfigError, exit_on_user_error, first_line
from ptune.logs import peak_memory_gib, setup_logging
from ptune.metrics import compute_metrics
from ptune.files import sha256_file, write_text_atomic
from ptune.models import (base_identity_settings, inference_model_settings, load_for_inference, position_limit,
                          read_checkpoint_config, resolve_checkpoint)
from ptune.prefix import attention_shape

log = logging.getLogger("ptune.evaluate")


@dataclass
class EvalSet:
    prompts: list[list[int]]
    labels: list[str]
    texts: list[str]
    rows_in_file: int  # before the row limit


def effective_limit(limit: int | None, rows_in_file: int) -> int | None:
    """The row limit as recorded with scores: None where it leaves no row out, so that scores made with
    limit=null and with a limit past the file's end are known to be the same."""
    return limit if limit and limit < rows_in_file else None


def eval_examples(path, data_cfg: dict):
    """The eval file's rows, read and checked without a tokenizer: a bad row is refused before a model loads."""
    return load_examples(path, Columns(data_cfg["prompt_column"], data_cfg["response_column"],
                                       data_cfg.get("history_column")))


def build_eval_set(examples, tokenizer, data_cfg: dict, template: str, limit: int | None = None) -> EvalSet:
    """Prompt ids and reference texts of `eval_examples`' rows; labels are cut to max_target_length tokens like
    the training targets."""
    rows_in_file = len(examples)
    if limit:
        examples = examples.select(range(min(limit, len(examples))))
    prompts, labels, lengths = [], [], []
    side = data_cfg.get("truncate_source_from", "right")  # a bare base with the setting left null: as in training
    # ChatGLM2's ptuning main.py tokenizes a reference with the tokenizer's special tokens ([gMASK] sop), which
    # count toward max_target_length: it is scored on that many fewer text tokens than the model trained on.
    # Its prompt format alone: other models have no reference script to match, and keep what training keeps.
    special = (len(tokenizer("", add_special_tokens=True)["input_ids"]) - len(text_ids(tokenizer, ""))
               if template == "chatglm2" else 0)
    keep = max(data_cfg["max_target_length"] - special, 0)
    for row in examples:
        whole = prompt_ids(tokenizer, row["prompt"], row["history"], template)
        prompts.append(fit_prompt(tokenizer, whole, template, data_cfg["max_source_length"], side))
        lengths.append(len(whole))
        target = text_ids(tokenizer, row["response"])
        cut = target[:keep]
        labels.append(decode_reply(tokenizer, cut) if len(cut) < len(target) else decode_text(tokenizer, cut))
    report_cut_prompts(data_cfg.get("eval_file", "eval file"), lengths, template, data_cfg["max_source_length"], side)
    return EvalSet(prompts, labels, list(examples["prompt"]), rows_in_file)


def auto_batch_size(model, prompt_len: int, new_tokens: int, device: torch.device, cap: int) -> int:
    """Rows whose KV cache fills half the free GPU memory; 16 on the CPU, where memory is not the limit."""
    if device.type != "cuda":
        return min(16, cap)
    shape = attention_shape(model.config)
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    # The prefix is not in it: generation keeps one copy of it for all rows.
    per_row = shape["num_layers"] * 2 * shape["num_kv_heads"] * shape["head_dim"] * (prompt_len + new_tokens)
    # Logits of one step and activations of the prefill cost about as much again as the cache.
    per_row = per_row * elem * 2 + model.config.get_text_config().vocab_size * 4
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(free * 0.5 // per_row)))


def check_positions(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse prompts and replies that do not fit the model's positions together, before generating: past them,
    a learned position table (GPT-2's n_positions) fails with an IndexError part-way through the eval set."""
    limit = position_limit(model)
    longest = max(map(len, prompts), default=0)
    if limit is None or longest + max_new_tokens <= limit[0]:
        return
    positions, key = limit
    # data.max_source_length bounds every prompt, template included, so either change alone makes them fit
    fixes = [f"{name} of at most {most}" for name, most in (("generation.max_new_tokens", positions - longest),
                                                           ("data.max_source_length", positions - max_new_tokens))
             if most > 0]
    fix = ", or ".join(fixes) or f"generation.max_new_tokens and data.max_source_length adding up to {positions}"
    raise ConfigError(f"generation.max_new_tokens={max_new_tokens}: the longest of the {len(prompts)} eval prompts "
                      f"has {longest} tokens, which with the reply need {longest + max_new_tokens} positions; the "
                      f"model has {positions} ({key}): expected {fix}")


def smaller_batch(batch_size: int, rows: int, auto: bool, prompt_len: int, new_tokens: int, reason: str) -> int:
    """The batch size to go on with after a batch of `rows` prompts ran out of memory: half as many where
    batch_size is auto (its guess from the free memory can be off: another process, the allocator's fragments);
    a batch_size that was set is the user's to change."""
    where = (f"a batch of {rows} prompt{'s' * (rows > 1)} of up to {prompt_len} tokens with {new_tokens} new "
             "tokens")
    if rows == 1:  # whatever batch_size says: a smaller batch is not what would fit
        raise ConfigError(f"out of memory generating {where} ({reason}); lower generation.max_new_tokens or "
                          "data.max_source_length, or free the device's memory")
    if not auto:
        raise ConfigError(f"batch_size={batch_size}: out of memory generating {where} ({reason}); lower "
                          "batch_size, or batch_size=auto to size it to the free memory")
    log.warning("out of memory generating %s; going on with batches of %d", where, rows // 2)
    return rows // 2


def predict(model, tokenizer, prompts: list[list[int]], gen: DictConfig, batch_size: int | str, device,
            progress: bool = True) -> tuple[list[str], dict]:
    """Generated texts in input order, and throughput figures."""
    device = torch.device(device)
    check_positions(model, prompts, gen.max_new_tokens)
    if device.type == "cuda":  # this generation's peak, not an earlier one's (a sweep's other base, say)
        torch.cuda.reset_peak_memory_stats(device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    auto = batch_size == "auto"
    if auto:
        batch_size = auto_batch_size(model, len(prompts[order[0]]), gen.max_new_tokens, device, len(prompts))
    eos = stop_token_ids(model, tokenizer, gen.get("extra_eos_token_ids"))
    stops = set(eos)
    texts: list[str | None] = [None] * len(prompts)
    new_tokens, start, done = 0, time.perf_counter(), 0
    # `with`: an interrupted bar's line is finished before the message that follows it
    with tqdm(total=len(prompts), desc="generate", disable=not progress) as bar:
        while done < len(order):
            idx = order[done:done + batch_size]
            batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in idx], tokenizer.pad_token_id).items()}
            try:
                # A row's samples are keyed by the seed and its place among the eval rows: the same at any batch
                # size, and in a batch that runs out of memory and is generated again.
                out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=gen.max_new_tokens,
                               eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, do_sample=gen.do_sample,
                               temperature=gen.temperature, top_p=gen.top_p,
                               sample_keys=[(int(gen.seed), i) for i in idx], compile_step=bool(gen.compile_step))
            except torch.OutOfMemoryError as e:
                out, reason = None, first_line(e)
            if out is None:  # out here, where the traceback no longer holds the failed batch's tensors
                batch_size = smaller_batch(batch_size, len(idx), auto, batch["input_ids"].shape[1],
                                           gen.max_new_tokens, reason)
                del batch
                release_decoding_memory(model)  # for the smaller batch to take what the failed one held
                continue
            done += len(idx)
            for row, i in zip(out.tolist(), idx):
                # The reply ends before its stop token, as in chat and serve: an extra stop token that is an
                # ordinary one (a newline, say) is not part of the prediction, nor is the padding after it.
                reply = row[:next((j for j, t in enumerate(row) if t in stops), len(row))]
                texts[i] = decode_reply(tokenizer, reply)  # what chat and serve answer
                new_tokens += len(reply)
            bar.update(len(idx))
    wall = time.perf_counter() - start
    stats = {"batch_size": batch_size, "wall_s": round(wall, 3), "new_tokens": new_tokens,
             "tokens_per_s": round(new_tokens / wall, 1), "peak_mem_gib": round(peak_memory_gib(device), 3)}
    return texts, stats


# How evaluate builds prompts and which text of a reply it scores; raise it whenever either changes, so that a
# sweep scores again instead of reusing scores made the old way. 2: a reply ends before its first stop token
# (an ordinary token given as an extra stop token stayed in the text). 3: a prompt cut from the left keeps the
# template's head and answer cue (they were cut with the text). 4: a reference or a reply whose tokens end
# part-way through a character (byte-level tokenizers) leaves that character out instead of ending in U+FFFD.
# 5: references cut with the tokenizer's special tokens counted (main.py's cut); texts decoded without the
# tokenizer's space cleanup (as chat and serve answer); a prompt cut from the left starts at a whole character.
# 6: each sampled row draws from its own random stream, keyed by the seed and its place among the eval rows, by
# inverse transform over the vocabulary in float64; metrics.json records the prefix's SHA-256.
PREDICTION_RULES = 6


def prefix_sha256(checkpoint) -> str | None:
    """SHA-256 of the prefix weights of `checkpoint` (None: the base alone, or no weights there any more). A sweep
    reuses scores only for the prefix they were made with: a checkpoint folder's prefix can be replaced under the
    same name (copied over, saved again by a rewound run, or while it was being scored)."""
    if checkpoint is None:
        return None
    folder = Path(checkpoint)
    names = [ckpt_io.PREFIX_FILE] if (folder / ckpt_io.PREFIX_FILE).is_file() else list(WEIGHT_FILES)
    digests = [sha256_file(folder / n) for n in names if (folder / n).is_file()]
    if not digests:
        return None
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def settings_record(data: dict, model: dict, limit, device: torch.device, eval_sha256: str | None = None,
                    prefix: str | None = None) -> dict:
    """What produced a metrics.json besides the generation settings: the prefix's and the eval file's contents,
    the data and model settings, the row limit, the prediction rules. ptune.evaluate and ptune.sweep both write
    it, at the top level; a sweep reuses earlier scores only where it matches."""
    eval_file = Path(str(data["eval_file"])).expanduser().resolve()
    record = {"prefix_sha256": prefix,
              "eval_sha256": eval_sha256 or sha256_file(eval_file), "data": {**data, "eval_file": str(eval_file)},
              "model": {**model, **base_identity_settings(model, device)}, "limit": limit,
              "prediction_rules": PREDICTION_RULES}
    return json.loads(json.dumps(record))  # as it reads back from the file (tuples become lists)


def write_results(out_dir: Path, evalset: EvalSet, texts: list[str], metrics: dict, extra: dict,
                  parents: bool = True) -> None:
    """Predictions, then the scores that go with them, each file replaced whole. The old metrics.json goes
    first: a run stopped in between leaves new predictions without scores, never under the old scores,
    which a sweep would reuse. `parents=False`: out_dir's folder must still be there (a checkpoint's eval/,
    which must not bring back a checkpoint removed meanwhile)."""
    out_dir.mkdir(parents=parents, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)
    rows = [json.dumps({"prompt": prompt, "label": label, "predict": text.strip()}, ensure_ascii=False) + "\n"
            for prompt, label, text in zip(evalset.texts, evalset.labels, texts)]
    write_text_atomic(out_dir / "generated_predictions.jsonl", "".join(rows))
    write_text_atomic(out_dir / "metrics.json", json.dumps({**metrics, **extra}, indent=2, ensure_ascii=False) + "\n")


def format_table(rows: list[dict], keys=("rouge-1", "rouge-2", "rouge-l", "bleu-4")) -> str:
    head = "| name | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def eval_settings(cfg: DictConfig, prefix_config: dict | None) -> tuple[dict, dict]:
    """Data and model settings: the checkpoint's, overridden by the non-null values in `cfg`."""
    recorded = (prefix_config or {}).get("data", {})
    data_cfg = {**recorded, **{k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                               if v is not None}}
    return data_cfg, inference_model_settings(prefix_config, OmegaConf.to_container(cfg.model))


def evaluate(cfg: DictConfig) -> dict:
    settings.evaluate(cfg)
    # a run folder stands for its newest complete checkpoint, as in chat and serve
    checkpoint = resolve_checkpoint(str(Path(str(cfg.checkpoint)).expanduser())) if cfg.checkpoint else None
    out_dir = Path(cfg.output_dir).expanduser() if cfg.output_dir else (Path(checkpoint) / "eval" if checkpoint
                                                            else Path("outputs/eval-base"))
    settings.check_writable(out_dir, "output_dir" if cfg.output_dir else None)
    prefix_config = read_checkpoint_config(checkpoint) if checkpoint else None
    prefix = prefix_sha256(checkpoint)  # what is scored: the files as they are before loading
    data_cfg, model_settings = eval_settings(cfg, prefix_config)
    examples = eval_examples(data_cfg["eval_file"], data_cfg)  # before the model's minutes of loading
    device = resolve_device(cfg.device)
    model, tokenizer, _ = load_for_inference(checkpoint, cfg.model, device, config=prefix_config)
    evalset = build_eval_set(examples, tokenizer, data_cfg, model_settings.get("template"), cfg.limit)
    texts, stats = predict(model, tokenizer, evalset.prompts, cfg.generation, cfg.batch_size, device)
    metrics = compute_metrics(texts, evalset.labels)
    if checkpoint and not cfg.output_dir and not Path(checkpoint).is_dir():
        raise CheckpointError(f"checkpoint={checkpoint}: removed while it was being scored (keep_last of a run still "
                              "training?); its eval/ would bring the folder back: give output_dir= to keep the scores")
    if checkpoint and Path(checkpoint).is_dir() and prefix_sha256(checkpoint) != prefix:
        raise CheckpointError(f"checkpoint={checkpoint}: its prefix changed while it was being scored (saved again by "
                              "a run still training?); nothing was written: score it again")
    record = settings_record(data_cfg, model_settings, effective_limit(cfg.limit, evalset.rows_in_file), device,
                             prefix=prefix)
    write_results(out_dir, evalset, texts, metrics,
                  {"generation": {**OmegaConf.to_container(cfg.generation), **stats},
                   "checkpoint": checkpoint,
                   "eval_file": record["data"]["eval_file"], **record})
    log.info("%d rows in %.1f s (%s tokens/s, batch %s, peak %.2f GiB); wrote %s", len(texts), stats["wall_s"],
             stats["tokens_per_s"], stats["batch_size"], stats["peak_mem_gib"], out_dir)
    print(format_table([{"name": checkpoint or "base", **metrics}]))
    return metrics


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    setup_logging()
    evaluate(cfg)

