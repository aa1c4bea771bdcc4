#!/usr/bin/env bash
# Serve a trained prefix over HTTP: ChatGLM2-6B's api.py request shape at POST /, an OpenAI-compatible
# /v1/chat/completions (streaming too), and a chat page at http://127.0.0.1:8000/.
#   bash recipes/serve.sh outputs/<run>/checkpoint-N [Hydra overrides, e.g. port=8001 max_batch_size=16]
#   bash recipes/serve.sh outputs/<run>           # that run's newest complete checkpoint
# Listens on 127.0.0.1 only. To expose it, pass host=0.0.0.0 and set a key (PTUNE_API_KEY=... or api_key=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
ARG=$1
CKPT=$1
shift
if [ ! -f "$CKPT/prefix_config.json" ]; then
    # A run folder: take its newest complete checkpoint.
    CKPT=$($PY -c 'import sys; from ptune.checkpoint import latest_checkpoint as l; c = l(sys.argv[1]); print(c or "")' "$CKPT")
    if [ -z "$CKPT" ]; then
        echo "serve.sh: $ARG is neither a checkpoint folder (no prefix_config.json) nor a run with a checkpoint" >&2
        exit 2
    fi
fi
case "$CKPT" in
    *\'*) echo "serve.sh: the checkpoint path may not contain a single quote: $CKPT" >&2; exit 2 ;;
esac
echo "serving $CKPT"
exec $PY -m ptune.serve "checkpoint='$CKPT'" "$@"
