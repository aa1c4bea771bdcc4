#!/usr/bin/env bash
# Time ptune against PEFT prefix tuning + HF Trainer on one GPU, on a ChatGLM2-6B-shaped model with
# random weights (nothing downloaded), and append the results to BENCHMARKS.md.
#   bash recipes/bench.sh [Hydra overrides, e.g. compile=true 'train_settings=[[16,1]]']
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ptune.bench benchmarks_md=BENCHMARKS.md out_json=outputs/bench/bench.json "$@"
