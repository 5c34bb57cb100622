#!/usr/bin/env bash
# Start titan_flow's reward server beside training: any registered reward, on a GPU of its own, over HTTP.
#
#   GPU=7 REWARDS=pickscore,ocr MODEL_PATHS=pickscore=/models/pickscore PORT=18090 ./launch/reward_server.sh &
#   CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 NGPU=7 CONFIG_FILE=train_configs/sd3_pickscore.toml ./launch/run_train.sh \
#       --reward.urls '{"pickscore": "http://127.0.0.1:18090/pickscore", "ocr": "http://127.0.0.1:18090/ocr"}'
#
# Environment:
#   REWARDS      comma-separated reward names to serve (required)
#   MODEL_PATHS  comma-separated NAME=PATH local weights (or take them from CONFIG_FILE's [reward] model_paths)
#   CONFIG_FILE  optional job TOML whose [reward] model_paths, options and device are used
#   GPU          CUDA_VISIBLE_DEVICES for the server (empty = leave as is); DEVICE = cpu to score on CPU
#   HOST, PORT   where to listen (127.0.0.1:18090); HOST=0.0.0.0 serves other nodes - trusted networks only
#   MAX_BATCH    most images merged into one model call (64)
# Extra arguments go to `python -m titan_flow.rewards.serve` (e.g. --option ocr.backend=rapidocr).
# The server opens its port once the models are loaded; the trainer retries until then
# (reward.max_retries, reward.retry_backoff_seconds). `curl http://HOST:PORT/health` shows what it serves.
# GenEval/DeQA run on yifan123/reward-server and UnifiedReward on sglang; this script is for the others.
set -euo pipefail
: "${REWARDS:?set REWARDS, e.g. REWARDS=pickscore,ocr}"
PYTHON=${PYTHON:-python}
args=(--rewards "$REWARDS" --host "${HOST:-127.0.0.1}" --port "${PORT:-18090}" --max-batch-size "${MAX_BATCH:-64}")
if [[ -n "${CONFIG_FILE:-}" ]]; then args+=(--config "$CONFIG_FILE"); fi
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "$DEVICE"); fi
IFS=',' read -ra paths <<< "${MODEL_PATHS:-}"
for p in "${paths[@]}"; do if [[ -n "$p" ]]; then args+=(--model-path "$p"); fi; done
if [[ -n "${GPU:-}" ]]; then export CUDA_VISIBLE_DEVICES="$GPU"; fi
exec "$PYTHON" -m titan_flow.rewards.serve "${args[@]}" "$@"
