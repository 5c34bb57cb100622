#!/usr/bin/env bash
# One line per node, the same everywhere except NODE_RANK:
#   MASTER_ADDR=10.0.0.1 NNODES=4 NODE_RANK=$i NPROC_PER_NODE=8 CONFIG_FILE=train_configs/bagel_full.toml \
#       ./launch/multinode.sh [--section.key value ...]
# Rendezvous: torchrun's c10d store on MASTER_ADDR:MASTER_PORT (node 0 hosts it). Nodes that have not
# all joined after RDZV_TIMEOUT seconds fail the launch. A rank that raises takes every rank down
# within seconds with its traceback in their logs, rank 0's included (distributed/utils.py
# FailureRelay); a rank that hangs fails the others after --parallelism.timeout_seconds.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_cpu.toml}
PYTHON=${PYTHON:-python}
RDZV_ID=${RDZV_ID:-titan_flow}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-900}
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    --rdzv-conf "join_timeout=$RDZV_TIMEOUT" --max-restarts 0 --role rank --tee 3 \
    -m titan_flow.train --job.config_file "$CONFIG_FILE" "$@"
