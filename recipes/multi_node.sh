#!/usr/bin/env bash
# P-tune on several machines at once: run this on every machine, each with its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash recipes/multi_node.sh +experiment=adgen_3000steps \
#       model.path=/models/chatglm2-6b data.train_file=/data/AdvertiseGen/train.json output_dir=/shared/runs/adgen
#   (then NODE_RANK=1 ... on the second machine, same MASTER_ADDR and the same overrides)
# NNODES machines, NODE_RANK this one's number (0 .. NNODES-1), MASTER_ADDR an address of machine 0 that the
# others reach; MASTER_PORT (default 29500) must be open there. NPROC: processes on this machine, one a GPU
# (default: every GPU it has). Every machine needs the model and the data at the same paths. output_dir is
# best a folder all machines share: only rank 0 writes it, and a resume reads it on every machine.
# The global batch is per_device_batch_size x gradient_accumulation_steps x NNODES x NPROC.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # a checkout that is not pip-installed works too
PY=${PYTHON:-python}
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; echo "multi_node.sh: $1" >&2; exit 2; }
[ $# -ge 1 ] || usage "pass the training overrides (at least +experiment=... and output_dir=...)"
[[ ${NNODES:-} =~ ^[1-9][0-9]*$ ]] || usage "NNODES=${NNODES:-} is not a number of machines (1 or more)"
[[ ${NODE_RANK:-} =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
  || usage "NODE_RANK=${NODE_RANK:-} is not one of 0 .. $((NNODES - 1))"
[ -n "${MASTER_ADDR:-}" ] || usage "MASTER_ADDR is not set: give an address of machine 0 the others reach"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-$($PY -c "import torch; print(max(torch.cuda.device_count(), 1))")}
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || usage "NPROC=$NPROC is not a number of processes (1 or more)"
echo "machine $NODE_RANK of $NNODES, $NPROC process(es) here, rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m ptune.train "$@"
