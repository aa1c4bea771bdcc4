#!/usr/bin/env bash
# Serve a trained prefix over HTTP: ChatGLM2-6B's api.py request shape at POST /, an OpenAI-compatible
# /v1/chat/completions (streaming too), and a chat page at http://127.0.0.1:8000/.
#   bash recipes/serve.sh outputs/<run>/checkpoint-N [Hydra overrides, e.g. port=8001 max_batch_size=16]
#   bash recipes/serve.sh outputs/<run>           # that run's newest complete checkpoint
# Listens on 127.0.0.1 only. To expose it, pass host=0.0.0.0 and set a key (PTUNE_API_KEY=... or api_key=...).
set -euo pipefail
# Stay in the caller's folder, so relative paths (the checkpoint, model.path=...) mean what they meant there;
# the repo goes on the import path instead, for a checkout that is not pip-installed.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CKPT=$1
shift
case "$CKPT" in
    *\'*) echo "serve.sh: the checkpoint path may not contain a single quote: $CKPT" >&2; exit 2 ;;
esac
# A run folder is taken by ptune.serve itself (its newest complete checkpoint).
exec $PY -m ptune.serve "checkpoint='$CKPT'" "$@"
