#!/usr/bin/env bash
# `make demo`: the whole flow on the embedded default (local CPU tritonserver), from a fresh clone.
# Usage: scripts/demo.sh PYTHON OUT_DIR ROW_LIMIT EPOCHS
set -euo pipefail
PY=${1:-.venv/bin/python}
DIR=${2:-demo}
LIMIT=${3:-8000}
EPOCHS=${4:-1}
HTTP_PORT=${DEMO_HTTP_PORT:-18000}
GRPC_PORT=${DEMO_GRPC_PORT:-18001}
METRICS_PORT=${DEMO_METRICS_PORT:-18002}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

t0=$(date +%s)
stage() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

rm -rf "$DIR"
mkdir -p "$DIR"

stage "1/6 data: ${LIMIT}-row stratified slice of the packaged Twitter sentiment corpus"
"$PY" -m finetune data --out "$DIR/data" --limit "$LIMIT"

stage "2/6 fine-tune all-MiniLM-L6-v2 (packaged) for $EPOCHS epoch(s) on the slice"
"$PY" -m finetune train --data "$DIR/data" --out "$DIR/finetuned_model" --epochs "$EPOCHS"

stage "3/6 export: ONNX fp32/fp16/int8, parity gate, Triton repository"
"$PY" -m exporter build "$DIR/finetuned_model" --out "$DIR/build" --repository "$DIR/model_repository"

stage "4/6 serve: real tritonserver on the CPU (loopback)"
"$PY" -m serving up --repository "$DIR/model_repository" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" --log-file "$DIR/tritonserver.log" &
server_pid=$!
for _ in $(seq 1 180); do
  if "$PY" -m serving health --url "127.0.0.1:$HTTP_PORT" >/dev/null 2>&1; then break; fi
  kill -0 "$server_pid" 2>/dev/null || { echo "server exited; see $DIR/tritonserver.log" >&2; exit 1; }
  sleep 1
done
"$PY" -m serving health --url "127.0.0.1:$HTTP_PORT"

stage "5/6 classify over HTTP and gRPC"
"$PY" -m serving classify --url "127.0.0.1:$HTTP_PORT" --protocol http \
  "I love how fast this new phone is" "worst customer service ever, never again" "the meeting is at 3pm tomorrow"
"$PY" -m serving classify --url "127.0.0.1:$GRPC_PORT" --protocol grpc \
  "self-driving cars just seem lazy and a waste of money"

stage "6/6 load test: 15 s of Locust over HTTP against the running server"
"$PY" -m loadtest run --host "http://127.0.0.1:$HTTP_PORT" --users 8 --spawn-rate 8 --duration 15s \
  --texts "$DIR/data/test.csv" --out "$DIR/loadtest" --fail-on-error

cleanup
server_pid=""
stage "done in $(( $(date +%s) - t0 )) s. Outputs:"
cat <<MSG
  data splits        $DIR/data/{train,validation,test}.csv
  checkpoint         $DIR/finetuned_model/  (metrics: $DIR/finetuned_model/metrics.json)
  export report      $DIR/build/report.md  $DIR/build/report.json  $DIR/build/report.png
  Triton repository  $DIR/model_repository/
  server log         $DIR/tritonserver.log
  load test          $DIR/loadtest/summary.json  (Locust HTML and CSV beside it, plot: *.png)
MSG
