#!/usr/bin/env bash
# Single node: NGPU=8 CONFIG_FILE=train_configs/sd3_geneval.toml ./launch/run_train.sh [--section.key value ...]
# On a CPU-only machine NGPU is the number of (gloo) processes. LOG_RANK picks the ranks whose output
# is shown (default 0; "0,1,2" or "" for all): a failing rank's traceback reaches rank 0's log anyway.
set -euo pipefail
NGPU=${NGPU:-8}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_cpu.toml}
PYTHON=${PYTHON:-python}
filter=()
if [[ -n "${LOG_RANK-0}" ]]; then filter=(--local-ranks-filter "${LOG_RANK-0}"); fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" \
    ${filter[@]+"${filter[@]}"} --role rank --tee 3 \
    -m titan_flow.train --job.config_file "$CONFIG_FILE" "$@"
