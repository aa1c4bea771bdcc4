#!/usr/bin/env bash
# Data-parallel check on N GPUs (default 2) against 1 GPU with the same global batch, on the
# ChatGLM2-6B-shaped model of ptune.bench (random bf16 weights, built and saved once, nothing downloaded).
#   DATA=/path/AdvertiseGen/train.json TOKENIZER=/path/with/tokenizer.model bash recipes/data_parallel.sh [override ...]
# Extra Hydra overrides on the command line go to every run (e.g. trainer.cuda_graphs=true).
# Runs, each 20 steps of micro-batch 16 with a checkpoint at 10:
#   one        python   -m ptune.train  accumulation N   (global batch 16 N)
#   multi      torchrun -m ptune.train  accumulation 1   (same global batch, same micro-batches)
#   one_again  `one` repeated: the run-to-run noise of the GPU kernels, the scale for the differences
#   multi_from_one  resumes `one`'s checkpoint-10 on N GPUs;  one_from_multi  the reverse (CHECK_RESUME=0 skips)
# then prints throughput, the prefix differences and which files each run wrote.
# FIXED_LENGTH=1 trains on rows all cut to the full 64 + 128 tokens, as ptune.bench's fixed rows are:
# consecutive AdvertiseGen rows strung together, so that every micro-batch has the same size.
# Relative paths given in MODEL, RUN_DIR, DATA and TOKENIZER are the caller's; the defaults the repository's.
set -euo pipefail
CALLER=$PWD
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }
# A path as one Hydra value: quoted, so that commas, brackets, = or non-ASCII letters in it are the path's.
q() { printf "'%s'" "${1//\'/\\\'}"; }
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
MODEL=${MODEL:+$(from_caller "$MODEL")}
MODEL=${MODEL:-outputs/glm6b-shape}
OUT=${RUN_DIR:+$(from_caller "$RUN_DIR")}
OUT=${OUT:-outputs/data_parallel}
DATA=${DATA:+$(from_caller "$DATA")}
DATA=${DATA:-../shared/data/advertisegen/train_5000.json}
TOKENIZER=${TOKENIZER:+$(from_caller "$TOKENIZER")}
TOKENIZER=${TOKENIZER:-../shared/chatglm}
STEPS=${STEPS:-20}

if [ ! -f "$MODEL/config.json" ]; then
  python - "$MODEL" <<'PY'
import sys, torch
from omegaconf import OmegaConf
from ptune.bench import build_model
model = build_model(OmegaConf.load("conf/bench.yaml"), torch.device("cuda"), torch.bfloat16)
model.save_pretrained(sys.argv[1])
print("saved", sys.argv[1])
PY
  cp "$TOKENIZER/tokenizer.model" "$MODEL/"
fi

if [ "${FIXED_LENGTH:-0}" = 1 ]; then
  python - "$DATA" "$OUT.rows.json" <<'PY'
import json, sys
from ptune.data import read_rows
# ChatGLM2's tokenizer gives at least 0.7 tokens a character of AdvertiseGen's content and 0.56 of its
# summaries: 200 and 400 characters are more than the 64 and 128 tokens kept.
rows, out = [row for _, row in read_rows(sys.argv[1])], []
for i in range(len(rows)):
    content = summary = ""
    j = i
    while len(content) < 200 or len(summary) < 400:
        content, summary, j = content + rows[j % len(rows)]["content"], summary + rows[j % len(rows)]["summary"], j + 1
    out.append({"content": content, "summary": summary})
with open(sys.argv[2], "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in out)
print("rows of full length:", sys.argv[2])
PY
  DATA="$OUT.rows.json"
fi

# Micro-batch 16 without checkpointing or CUDA graphs, padded to 8: the settings BENCHMARKS.md's 2-GPU table used.
common=(+experiment=adgen_60steps model=local "model.path=$(q "$MODEL")" model.template=chatglm2 "data.train_file=$(q "$DATA")"
        trainer.per_device_batch_size=16 trainer.gradient_checkpointing=false trainer.pad_to_multiple_of=8
        trainer.cuda_graphs=false "trainer.max_steps=$STEPS" "trainer.save_steps=$((STEPS / 2))"
        trainer.log_steps=5 trainer.progress_bar=false trainer.tensorboard=false "$@")
torchrun_=(torchrun --standalone --nproc_per_node "$NPROC" -m ptune.train)
rm -rf "$OUT"
python -m ptune.train "${common[@]}" "trainer.gradient_accumulation_steps=$NPROC" "output_dir=$(q "$OUT/one")"
"${torchrun_[@]}" "${common[@]}" trainer.gradient_accumulation_steps=1 "output_dir=$(q "$OUT/multi")"
# The 1-GPU run once more: GPU attention kernels are not bitwise deterministic, so this is the noise floor.
python -m ptune.train "${common[@]}" "trainer.gradient_accumulation_steps=$NPROC" "output_dir=$(q "$OUT/one_again")"
if [ "${CHECK_RESUME:-1}" = 1 ]; then
  "${torchrun_[@]}" "${common[@]}" trainer.gradient_accumulation_steps=1 "output_dir=$(q "$OUT/multi_from_one")" \
    "resume=$(q "$OUT/one/checkpoint-$((STEPS / 2))")"
  python -m ptune.train "${common[@]}" "trainer.gradient_accumulation_steps=$NPROC" "output_dir=$(q "$OUT/one_from_multi")" \
    "resume=$(q "$OUT/multi/checkpoint-$((STEPS / 2))")"
fi

python - "$OUT" "$STEPS" "$NPROC" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file

out, steps, nproc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def prefix(run):
    return load_file(out / run / f"checkpoint-{steps}" / "prefix.safetensors")["embedding.weight"].float()
def log(run):
    return [json.loads(line) for line in (out / run / "train_log.jsonl").read_text().splitlines()]
def steady(run):  # log windows after the first (warm-up) whose time holds no checkpoint save
    rows = log(run)
    clean = [r["tokens_per_s"] for r in rows[1:] if (r["step"] - 5) % (steps // 2)]
    return sum(clean) / len(clean) if clean else rows[-1]["tokens_per_s"]
ref = prefix("one")
runs = [r for r in ("one_again", "multi", "multi_from_one", "one_from_multi") if (out / r).is_dir()]
for run in runs:
    d = prefix(run) - ref
    print(f"prefix {run} vs one: max |diff| {d.abs().max():.3e}, |diff|/|one| {d.norm() / ref.norm():.3e}")
print("losses one  :", [r["loss"] for r in log("one")])
print("losses multi:", [r["loss"] for r in log("multi")])
t1, tn = steady("one"), steady("multi")
print(f"tokens/s: 1 GPU {t1:.0f}, {nproc} GPUs {tn:.0f}, speed-up {tn / t1:.2f}x")
print("peak GiB per GPU: one", log("one")[-1]["peak_mem_gib"], "multi", log("multi")[-1]["peak_mem_gib"])
for run in ["one"] + runs:
    print(run, sorted(str(p.relative_to(out / run)) for p in (out / run).rglob("*")))
PY
