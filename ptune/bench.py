"""Throughput benchmark: ptune against PEFT prefix tuning + the HF Trainer, on one model built from a config.

`python -m ptune.bench` (defaults: a ChatGLM2-6B-shaped GlmForCausalLM with random bf16 weights on one
GPU — speed does not depend on the values). In one process and on identical data it times
  train: ptune's optimizer step and PEFT + HF Trainer, samples/s, tokens/s, MFU, peak memory;
  eval:  ptune's batched generation and PEFT `generate`, at batch 1 and at a large batch;
then writes a JSON report and appends a row per measurement to BENCHMARKS.md.
"""

from __future__ import annotations

# Run as a command, the config is composed (and --help or a setting Hydra refuses answered) before the
# imports below take their seconds; ptune.command then imports this module again and calls main(cfg).
if __name__ == "__main__":
    from ptune.command import run_command

    run_command("bench")

import datetime as dt
import gc
import json
import logging
import platform
import random
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ptune import settings
from ptune.settings import resolve_device
from ptune.data import IGNORE, BatchPlan, collate, left_pad
from ptune.errors import ConfigError, exit_on_user_error
from ptune.generate import generate
from ptune.logs import setup_logging
from ptune.loss import output_softcap
from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec, compile_layers
from ptune.fit import Prober, choose_split, release_probe_memory
from ptune.graphs import micro_batch_loss
from ptune.layers import fuse_layers
from ptune.step import optimizer_step

log = logging.getLogger("ptune.bench")


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**OmegaConf.to_container(cfg.model_config, resolve=True))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    model.requires_grad_(False).eval()
    return model


def fixed_rows(n: int, src: int, tgt: int, vocab: int, seed: int) -> list[dict]:
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [g.randrange(10, vocab) for _ in range(src + tgt)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * src + ids[src:]})
    return rows


def adgen_rows(cfg: DictConfig, vocab: int, seed: int) -> list[dict] | None:
    """Rows with the token lengths of real AdvertiseGen rows, tokenized and cut as training does (ChatGLM
    tokenizer, chatglm2 template); their ids are random, only the lengths are kept."""
    data, tok_dir = Path(cfg.adgen_file), Path(cfg.chatglm_tokenizer_dir)
    if not (data.is_file() and (tok_dir / "tokenizer.model").is_file()):
        log.info("no AdvertiseGen slice at %s (or tokenizer at %s): skipping the real-lengths run", data, tok_dir)
        return None
    from ptune.chatglm.tokenizer import load_tokenizer
    from ptune.data import Encoding, encode_example, read_rows

    tok = load_tokenizer(tok_dir)
    # No truncate_source_from setting: either side cuts a prompt to the same length, and only lengths are kept.
    enc = Encoding("chatglm2", cfg.max_source_length, cfg.max_target_length)
    g = random.Random(seed)
    rows = []
    for _, row in read_rows(data)[: cfg.num_rows]:
        example = encode_example(tok, enc, row["content"], row["summary"], [])
        src = example["labels"].count(IGNORE)
        ids = [g.randrange(10, vocab) for _ in range(len(example["input_ids"]))]
        rows.append({"input_ids": ids, "labels": [IGNORE] * src + ids[src:]})
    return rows


def pad_batch_to(batch: dict, width: int) -> dict:
    extra = width - batch["input_ids"].shape[1]
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def count_flops_params(model) -> int:
    """Parameters that do matrix work per token (the input embedding is a lookup)."""
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def timed(fn, sync: bool) -> float:
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def reset_memory(device):
    gc.collect()  # graphed callables hold their graphs' memory through reference cycles
    if device.type == "cuda":  # no earlier measurement's graph is replayed again
        release_probe_memory()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def load_timing(model, cfg, device, modes: list[str | None]) -> dict[str | None, dict]:
    """For each quantization mode (None: not quantized), seconds and device memory to load `model` from a model
    folder through ptune's loader. The folder is written once (a temporary one beside out_json) and `model` stays
    where it is, so the peak is counted above what it holds."""
    import tempfile

    from ptune.models import load_model

    out = Path(cfg.out_json).expanduser().parent
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    with tempfile.TemporaryDirectory(dir=out, prefix=".bench-model-") as folder:
        model.save_pretrained(folder)
        for mode in modes:
            settings = OmegaConf.create({
                "path": folder, "dtype": str(model.dtype).removeprefix("torch."), "quantization": mode,
                "attn_implementation": cfg.attn_implementation, "trust_remote_code": False,
                "quantization_group_size": cfg.quantization_group_size, "quantization_cache": None,
                "fused_layers": cfg.fused_layers})
            reset_memory(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            loaded = {}
            r = {"seconds": timed(lambda: loaded.update(model=load_model(settings, device)), device.type == "cuda")}
            if device.type == "cuda":
                r["held_gib"] = round((torch.cuda.memory_allocated(device) - before) / 2**30, 2)
                r["peak_gib"] = round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 2)
            loaded.clear()  # before the next mode loads
            timings[mode] = r
    reset_memory(device)
    return timings


def ptune_train(model, rows, micro: int, accum: int, cfg, device, *, pad_to: int | None, sort: bool,
                checkpointing: bool | str, compiled: bool = False, group_by_length: int = 0, graphs: bool = False,
                pad_multiple: int | None = None, fit_gib: float | None = None) -> dict:
    """`checkpointing`: recompute every layer (True), none (False), or "auto" (as few as `fit_gib` needs).
    `pad_multiple`: None pads as cfg.pad_to_multiple_of says."""
    fuse_layers(model, bool(cfg.fused_layers))
    spec = PrefixSpec.for_model(model.config, cfg.prefix_length)
    lm = PrefixLM(model, PrefixEncoder(spec, dropout=float(cfg.prefix_dropout)).to(device))
    if pad_multiple is None:
        pad_multiple = int(cfg.pad_to_multiple_of)
    num_layers = model.config.num_hidden_layers
    lm.recompute_layers(num_layers if checkpointing is True else 0)
    try:
        return _ptune_train(lm, rows, micro, accum, cfg, device, pad_to=pad_to, sort=sort, checkpointing=checkpointing,
                            compiled=compiled, group_by_length=group_by_length, graphs=graphs,
                            pad_multiple=pad_multiple, fit_gib=fit_gib)
    finally:
        lm.recompute_layers(0)  # the next measurement starts from the plain model


def _ptune_train(lm, rows, micro, accum, cfg, device, *, pad_to, sort, checkpointing, compiled, group_by_length,
                 graphs, pad_multiple, fit_gib) -> dict:
    model = lm.base
    if compiled:
        compile_layers(model)
    lm.train()
    params = list(lm.prefix.parameters())
    optimizer = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    # Every shape is captured (the bench's shapes are few), so the timed steps replay graphs only.
    loss_fn = micro_batch_loss(lm, cfg.loss_chunk_size, output_softcap(model.config), cuda_graphs=graphs,
                               max_shapes=10_000)
    # The trainer's own batch plan, so the benchmark times the batches training makes.
    lengths = [len(r["input_ids"]) for r in rows]
    targets = [sum(1 for x in r["labels"][1:] if x != IGNORE) for r in rows]

    def plan_for(m: int, a: int) -> BatchPlan:
        return BatchPlan(lengths, targets, m, a, 1, cfg.seed, sort, group_by_length, pad_multiple)

    fitted = {}
    if fit_gib:  # the trainer's trainer.auto_micro_batch_gib, on these rows
        def new_loss():
            return micro_batch_loss(lm, cfg.loss_chunk_size, output_softcap(model.config), cuda_graphs=graphs,
                                    max_shapes=1)

        prober = Prober(plan_for, rows, lengths, cfg.warmup_steps + 2 * cfg.steps, micro * accum, new_loss, params,
                        0, pad_multiple, device)
        chosen = choose_split(prober, fit_gib, "auto" if checkpointing == "auto" else lm.recomputed_layers,
                              model.config.num_hidden_layers, lm.recompute_layers)[0]
        if chosen is None:
            return {"split": "none", "seconds": float("nan"), "fits": False}
        lm.recompute_layers(chosen.layers)
        micro, accum = chosen.micro, chosen.accumulation
        fitted = {"split": f"{micro}x{accum}", "probe_peak_gib": round(chosen.peak_gib, 2),
                  "recomputed_layers": chosen.layers}
    plan = plan_for(micro, accum)

    def batches_for(step: int):
        out = []
        for mb in plan.micro_batches(step, 0):
            b = collate([rows[r] for r in mb], 0, pad_multiple)
            if pad_to:  # reference-style: every row padded to the longest possible row
                b = pad_batch_to(b, pad_to)
            out.append({k: v.to(device) for k, v in b.items()})
        return out, plan.target_tokens(step)

    def one(step):
        batches, targets = batches_for(step)
        optimizer_step(loss_fn, params, batches, targets, optimizer, scaler, max_grad_norm=float(cfg.max_grad_norm))

    sync = device.type == "cuda"
    reset_memory(device)
    # With graphs the timed steps are also run once beforehand, so that every shape they meet is captured
    # before timing: a real run captures each of its few shapes once and replays them for thousands of steps.
    for s in range(cfg.warmup_steps + (cfg.steps if graphs else 0)):
        one(s)
    seconds = 0.0
    real = 0
    for s in range(cfg.warmup_steps, cfg.warmup_steps + cfg.steps):
        seconds += timed(lambda: one(s), sync)
        real += sum(len(rows[r]["input_ids"]) for r in plan.global_rows(s))
    samples = cfg.steps * plan.global_batch
    return {"samples_per_s": samples / seconds, "tokens_per_s": real / seconds, "peak_gib": peak_gib(device),
            "seconds": seconds, "steps": cfg.steps, **fitted}


def peft_train(model, rows, micro: int, accum: int, cfg, device, pad_to: int) -> dict:
    """PEFT PrefixTuning through the HF Trainer, rows padded to `pad_to` like the reference scripts."""
    import tempfile

    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    fuse_layers(model, False)  # the baseline runs the model's own code
    model.set_attn_implementation(cfg.attn_implementation)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                          num_virtual_tokens=cfg.prefix_length))

    def collate_fn(group):
        return pad_batch_to(collate(group, 0), pad_to)

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
            max_steps=cfg.warmup_steps + cfg.steps, learning_rate=float(cfg.lr), lr_scheduler_type="constant",
            bf16=device.type == "cuda", logging_steps=10_000, save_strategy="no", report_to=[],
            dataloader_num_workers=0, remove_unused_columns=False, use_cpu=device.type != "cuda",
            weight_decay=float(cfg.weight_decay), max_grad_norm=float(cfg.max_grad_norm),
        )
        reset_memory(device)
        Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collate_fn,
                callbacks=[Clock()]).train()
    seconds = sum(times[cfg.warmup_steps:])
    samples = cfg.steps * micro * accum
    real = samples * sum(len(r["input_ids"]) for r in rows) / len(rows)
    result = {"samples_per_s": samples / seconds, "tokens_per_s": real / seconds, "peak_gib": peak_gib(device),
              "seconds": seconds, "steps": cfg.steps}
    return result


def widen_timing(model, device, fused: bool) -> dict:
    """Seconds to widen every quantized layer's weight once (what each forward and each backward pays)."""
    from ptune import quant as Q

    layers = [m for m in model.modules() if isinstance(m, Q.QuantizedLinear)]
    fn = Q._dequantize_on(device) if fused else Q.dequantize

    def widen():
        for m in layers:
            fn(m.qweight, m.scale, m.offset, m.in_features, m.group_size, torch.bfloat16)

    widen()  # the first call compiles the kernels
    return {"seconds": min(timed(widen, device.type == "cuda") for _ in range(5)), "layers": len(layers)}


def ptune_eval(model, prompts, new_tokens: int, batch: int, cfg, device, *, static_cache: bool = True,
               keep: list | None = None, compile_step: bool = False, sampled: bool = False) -> dict:
    """`sampled`: every row samples with cfg.eval_sampling's temperature and top_p, from its own stream."""
    fuse_layers(model, bool(cfg.fused_layers))
    spec = PrefixSpec.for_model(model.config, cfg.prefix_length)
    torch.manual_seed(cfg.seed)
    lm = PrefixLM(model, PrefixEncoder(spec).to(device))

    def run(count=len(prompts), new=new_tokens, record=True):
        for i in range(0, count, batch):
            b = {k: v.to(device) for k, v in left_pad(prompts[i:min(i + batch, count)], 0).items()}
            sampling = (dict(do_sample=True, temperature=float(cfg.eval_sampling.temperature),
                             top_p=float(cfg.eval_sampling.top_p), sample_keys=[(cfg.seed, i + j) for j in range(
                                 len(b["input_ids"]))]) if sampled else {})
            out = generate(lm, b["input_ids"], b["attention_mask"], max_new_tokens=new, eos_token_ids=[],
                           pad_token_id=0, static_cache=static_cache, compile_step=compile_step, **sampling)
            if keep is not None and record:
                keep.extend(out.tolist())

    # one-time costs out of the timing: kernel compilation, matmul heuristics for these shapes
    run(batch, 2, record=False)
    reset_memory(device)
    seconds = timed(run, device.type == "cuda")
    return {"seconds": seconds, "tokens_per_s": len(prompts) * new_tokens / seconds, "peak_gib": peak_gib(device)}


def decode_steady(model, prompts, batch: int, cfg, device, compile_step: bool = False) -> dict:
    """Per-step decoding time without prefill and set-up: generate cfg.decode_steady_tokens' two counts of new
    tokens, divide the difference by the extra steps."""
    short, long = (int(n) for n in cfg.decode_steady_tokens)
    fuse_layers(model, bool(cfg.fused_layers))
    spec = PrefixSpec.for_model(model.config, cfg.prefix_length)
    lm = PrefixLM(model, PrefixEncoder(spec).to(device))
    b = {k: v.to(device) for k, v in left_pad(prompts[:batch], 0).items()}

    def gen(n):
        return timed(lambda: generate(lm, b["input_ids"], b["attention_mask"], max_new_tokens=n, eos_token_ids=[],
                                      pad_token_id=0, compile_step=compile_step), device.type == "cuda")

    gen(short)  # warm-up
    t_short, t_long = gen(short), gen(long)
    per_step = (t_long - t_short) / (long - short)
    return {"seconds": per_step, "tokens_per_s": batch / per_step, "setup_and_first_tokens_s": t_short}


def same_prefix_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(rows: list[list[int]], reference: list[list[int]], new_tokens: int) -> dict:
    """Rows whose greedy tokens equal the reference's, and tokens agreeing on average before a difference."""
    agree = [same_prefix_length(a, b) for a, b in zip(rows, reference)]
    return {"identical_rows": sum(x == new_tokens for x in agree), "mean_agreeing_tokens": sum(agree) / len(agree)}


def peft_eval(model, prompts, new_tokens: int, batch: int, cfg, device) -> dict:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    fuse_layers(model, False)
    model.set_attn_implementation(cfg.attn_implementation)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                          num_virtual_tokens=cfg.prefix_length)).to(device)
    peft_model.eval()

    def run(count=len(prompts), new=new_tokens):
        with torch.no_grad():
            for i in range(0, count, batch):
                b = {k: v.to(device) for k, v in left_pad(prompts[i:min(i + batch, count)], 0).items()}
                peft_model.generate(**b, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    run(batch, 2)  # warmed up like ptune's
    reset_memory(device)
    seconds = timed(run, device.type == "cuda")
    return {"seconds": seconds, "tokens_per_s": len(prompts) * new_tokens / seconds, "peak_gib": peak_gib(device)}


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


def append_markdown(path: Path, report: dict, command: str) -> None:
    if not path.exists():
        path.write_text("# Benchmarks\n\nRows appended by `python -m ptune.bench`; each names its card, date and "
                        "command.\n", encoding="utf-8")
    lines = [f"\n## {report['date']} · {report['device']} · `{command}`\n",
             f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
             f"peft {report['versions'].get('peft', '-')}; model {report['model']}; prefix {report['prefix_length']}\n",
             "| measurement | samples/s | tokens/s | MFU | peak GiB | seconds | ratio vs baseline |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        sps = f"{r['samples_per_s']:.2f}" if "samples_per_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x vs {r['baseline']}" if r.get("ratio") else "-"
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        lines.append(f"| {name} | {sps} | {tps} | {mfu} | {r.get('peak_gib') or '-'} | "
                     f"{r['seconds']:.2f} | {ratio} |")
    for name, r in report["results"].items():
        if "identical_rows" in r:
            other = "eager step's" if "+compile" in name else "static-cache decoder's"
            lines.append(f"\n{name}: {r['identical_rows']} of its rows' greedy tokens identical to the {other}; "
                         f"{r['mean_agreeing_tokens']:.1f} tokens agree on average before the first difference.")
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def batches_run(cfg: DictConfig, key: str, prompts: int) -> list[int]:
    """cfg[key]'s batch sizes as they run on `prompts` prompts: a larger one runs them all in one batch, so it is
    named by that count (as eval_check_prompts is), and a size reached twice is timed once."""
    sizes = []
    for batch in cfg[key]:
        if batch > prompts:
            log.info("%s: %d is more than eval_prompts=%d; timing batch %d instead", key, batch, prompts, prompts)
        sizes.append(min(int(batch), prompts))
    return list(dict.fromkeys(sizes))


def bench_device(cfg: DictConfig) -> torch.device:
    """The device to time on, with what it rules out (conf/bench.yaml's other values: ptune.settings.bench)."""
    device = resolve_device(cfg.device)
    if device.type == "cpu" and str(cfg.device) == "auto":
        # The default model_config is a 6B model: on the CPU it would take hours and ~50 GB before a first number.
        shape = cfg.model_config
        raise ConfigError(f"device=auto: this machine has no GPU, and the benchmark times GPUs (model_config builds "
                          f"a {shape.get('num_hidden_layers', '?')}-layer, hidden-{shape.get('hidden_size', '?')} "
                          f"model); pass device=cpu to run it on the CPU anyway, with a small model_config")
    if cfg.auto_micro_batch_gib is not None and device.type != "cuda":
        raise ConfigError(f"auto_micro_batch_gib={cfg.auto_micro_batch_gib}: measures GPU memory, and this run is "
                          f"on {device.type}")
    return device

def run(cfg: DictConfig) -> dict:
    settings.bench(cfg)
    device = bench_device(cfg)
    graphs = bool(cfg.cuda_graphs) and device.type == "cuda"
    if cfg.cuda_graphs and not graphs:
        # micro_batch_loss runs eager off CUDA: such rows would repeat the plain ones under a +graphs name.
        log.info("cuda_graphs: no CUDA on %s, so the +graphs rows are skipped", device.type)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device, dtype)
    vocab = model.config.vocab_size
    flops_per_token = 4 * count_flops_params(model)  # before quantizing: quantized weights are buffers
    fixed = fixed_rows(cfg.num_rows, cfg.max_source_length, cfg.max_target_length, vocab, cfg.seed)
    pad_to = cfg.max_source_length + cfg.max_target_length + 1
    results: dict[str, dict] = {}

    def add(name, r, baseline=None):
        if "tokens_per_s" in r and "samples_per_s" in r and device.type == "cuda":
            r["mfu"] = r["tokens_per_s"] * flops_per_token / (cfg.peak_tflops * 1e12)
        if baseline and baseline in results:
            key = next((k for k in ("samples_per_s", "tokens_per_s") if k in r), None)
            ratio = r[key] / results[baseline][key] if key else results[baseline]["seconds"] / r["seconds"]
            r["ratio"], r["baseline"] = ratio, baseline
        results[name] = r
        log.info("%s: %s", name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))

    modes = list(dict.fromkeys(m or None for m in cfg.load_timing))
    for mode, r in (load_timing(model, cfg, device, modes) if modes else {}).items():
        add(f"load the base from its folder, {mode or 'not quantized'} (peak GiB above the model built here)", r)
    quant = None
    if cfg.get("quantization"):
        from ptune import quant as Q

        Q.FUSED_DEQUANTIZE = bool(cfg.fused_dequantize)
        Q.FUSED_SMALL_MATMUL = bool(cfg.fused_small_matmul)
        quant = Q.quantize_model(model, cfg.quantization, int(cfg.quantization_group_size))
        log.info("quantized the base: %s", quant)
    if quant and cfg.widen_timing:
        add("widen quantized base, eager", widen_timing(model, device, fused=False))
        if device.type == "cuda" and cfg.fused_dequantize:
            add("widen quantized base, fused kernel", widen_timing(model, device, fused=True),
                "widen quantized base, eager")

    for micro, accum in cfg.train_settings:
        tag = f"mb{micro}x{accum}"
        if "peft" in cfg.compare:
            add(f"train peft {tag}", peft_train(model, fixed, micro, accum, cfg, device, pad_to))
        add(f"train ptune {tag}", ptune_train(model, fixed, micro, accum, cfg, device, pad_to=None, sort=True,
                                              checkpointing=False), f"train peft {tag}")
        if cfg.compile:
            add(f"train ptune {tag} +compile", ptune_train(model, fixed, micro, accum, cfg, device, pad_to=None,
                                                           sort=True, checkpointing=False, compiled=True),
                f"train peft {tag}")
            if graphs:
                add(f"train ptune {tag} +compile +graphs",
                    ptune_train(model, fixed, micro, accum, cfg, device, pad_to=None, sort=True, checkpointing=False,
                                compiled=True, graphs=True), f"train peft {tag}")
            for layer in model.get_decoder().layers:  # back to eager for what follows
                layer._compiled_call_impl = None
        if graphs:
            add(f"train ptune {tag} +graphs", ptune_train(model, fixed, micro, accum, cfg, device, pad_to=None,
                                                          sort=True, checkpointing=False, graphs=True),
                f"train peft {tag}")
        if cfg.gradient_checkpointing:
            add(f"train ptune {tag} +ckpt", ptune_train(model, fixed, micro, accum, cfg, device, pad_to=None,
                                                        sort=True, checkpointing=True), f"train ptune {tag}")
        if cfg.gradient_checkpointing and graphs:
            add(f"train ptune {tag} +ckpt +graphs", ptune_train(model, fixed, micro, accum, cfg, device, pad_to=None,
                                                                sort=True, checkpointing=True, graphs=True),
                f"train ptune {tag}")
        for ckpt in (False, True, "auto") if cfg.auto_micro_batch_gib else ():
            r = ptune_train(model, fixed, micro, accum, cfg, device, pad_to=None, sort=True, checkpointing=ckpt,
                            graphs=graphs, fit_gib=cfg.auto_micro_batch_gib)
            recomputed = {False: "", True: " +ckpt"}.get(ckpt, " +ckpt auto" + (
                f" ({r['recomputed_layers']} of {model.config.num_hidden_layers} layers)" if r.get("fits", True) else ""))
            add(f"train ptune {micro * accum} rows, auto <= {cfg.auto_micro_batch_gib} GiB: {r['split']}" + recomputed
                + (" +graphs" if graphs else "") + ("" if r.get("fits", True) else " (nothing fits)"),
                r, f"train peft {tag}" if r.get("fits", True) else None)
    real = adgen_rows(cfg, vocab, cfg.seed) if cfg.adgen_settings else None
    for micro, accum in cfg.adgen_settings if real is not None else []:
        tag = f"mb{micro}x{accum}"
        base = f"train ptune adgen {tag} padded-193"
        add(base, ptune_train(model, real, micro, accum, cfg, device, pad_to=pad_to, sort=False, checkpointing=False))
        k = int(cfg.adgen_group_by_length)
        for graphed in (False, True) if graphs else (False,):
            more = dict(graphs=True, pad_multiple=int(cfg.graphs_pad_to_multiple_of)) if graphed else {}
            plus = " +graphs" if graphed else ""
            add(f"train ptune adgen {tag} sorted{plus}", ptune_train(model, real, micro, accum, cfg, device,
                                                                      pad_to=None, sort=True, checkpointing=False,
                                                                      **more), base)
            if k:
                add(f"train ptune adgen {tag} grouped-{k}{plus}",
                    ptune_train(model, real, micro, accum, cfg, device, pad_to=None, sort=True, checkpointing=False,
                                group_by_length=k, **more), base)
    g = random.Random(cfg.seed)
    prompts = [[g.randrange(10, vocab) for _ in range(cfg.max_source_length)] for _ in range(cfg.eval_prompts)]
    for batch in batches_run(cfg, "eval_batches", len(prompts)):
        n = min(len(prompts), cfg.eval_prompts_at_batch1) if batch == 1 else len(prompts)
        if "peft" in cfg.compare:
            add(f"eval peft batch {batch} ({n} prompts)", peft_eval(model, prompts[:n], cfg.eval_new_tokens, batch,
                                                                   cfg, device))
        add(f"eval ptune batch {batch} ({n} prompts)", ptune_eval(model, prompts[:n], cfg.eval_new_tokens, batch, cfg,
                                                                 device), f"eval peft batch {batch} ({n} prompts)")
    for batch in batches_run(cfg, "eval_sampled_batches", len(prompts)):
        n = min(len(prompts), cfg.eval_prompts_at_batch1) if batch == 1 else len(prompts)
        add(f"eval ptune batch {batch} ({n} prompts) sampled", ptune_eval(
            model, prompts[:n], cfg.eval_new_tokens, batch, cfg, device, sampled=True),
            f"eval ptune batch {batch} ({n} prompts)")
    for batch in batches_run(cfg, "decode_steady_batches", len(prompts)):
        add(f"decode ptune steady batch {batch} (seconds a step)", decode_steady(model, prompts, batch, cfg, device))
    for batch in batches_run(cfg, "decode_compile_batches", len(prompts)):
        # Compiled decoding step: the first call compiles (not timed), then end to end, steady state, and
        # greedy tokens against the eager step's.
        n = min(len(prompts), cfg.eval_prompts_at_batch1) if batch == 1 else batch
        eager, fused = [], []
        ptune_eval(model, prompts[:batch], 2, batch, cfg, device, compile_step=True)
        ptune_eval(model, prompts[:n], cfg.eval_new_tokens, batch, cfg, device, keep=eager)
        r = ptune_eval(model, prompts[:n], cfg.eval_new_tokens, batch, cfg, device, keep=fused, compile_step=True)
        r.update(agreement(fused, eager, cfg.eval_new_tokens))
        add(f"eval ptune batch {batch} ({n} prompts) +compile", r)
        add(f"decode ptune steady batch {batch} +compile (seconds a step)",
            decode_steady(model, prompts, batch, cfg, device, compile_step=True))
    if cfg.eval_check_prompts:
        # Greedy tokens of the static-cache (graph-replayed) decoder against the growing-cache path.
        n = min(len(prompts), cfg.eval_check_prompts)
        fast, plain = [], []
        add(f"eval ptune batch {n} ({n} prompts)", ptune_eval(model, prompts[:n], cfg.eval_new_tokens, n, cfg, device,
                                                             keep=fast))
        r = ptune_eval(model, prompts[:n], cfg.eval_new_tokens, n, cfg, device, static_cache=False, keep=plain)
        r.update(agreement(plain, fast, cfg.eval_new_tokens))
        add(f"eval ptune growing cache batch {n} ({n} prompts)", r, f"eval ptune batch {n} ({n} prompts)")
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    report = {"date": dt.date.today().isoformat(), "device": device_name(device), "versions": versions,
              "model": cfg.model_name + (f", {quant['mode']} base" if quant else ""),
              "prefix_length": cfg.prefix_length, "results": results, "quantization": quant,
              "config": OmegaConf.to_container(cfg, resolve=True)}
    out = Path(cfg.out_json).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if cfg.benchmarks_md:
        append_markdown(Path(cfg.benchmarks_md).expanduser(), report, cfg.command_label or command_line())
    return report


def command_line() -> str:
    """The command as run, for the table's heading; where the files went is left out (it is local)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = (OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False) if HydraConfig.initialized()
                 else [])
    kept = [o for o in overrides if not o.startswith(("benchmarks_md=", "out_json="))]
    return " ".join(["python -m ptune.bench", *kept])


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    setup_logging()
    run(cfg)

