#!/usr/bin/env bash
# make demo: the whole study end to end on this machine.
#   1. a CIFAR-10 python archive: $DATA if set, else a small one generated here
#   2. a local Ray head (loopback, no auth), the conversion submitted with `ray job submit`
#   3. `node-agent matrix` over every loader this machine can run (packed tars included)
#   4. the packed tars streamed from the store (`node-agent run --no-cache`), beside
#      their cached runs, and the loaders alone (`node-agent matrix --bench`)
#   5. `node-agent report`: comparison tables, format sizes, charts, a recommendation
# Every long step prints its progress (convert: images and time left; matrix: pairs done
# and left, time left, a summary table); the demo ends with the path of report.html.
# The Ray head started here is stopped by its own process group on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${DEMO_OUT:-$ROOT/demo-out}
EPOCHS=${EPOCHS:-2}
TRAIN=${TRAIN:-2000}   # generated archive: training images (over the 5 batch files)
TEST=${TEST:-500}
FORMATS=${FORMATS:-bmp,png,tiff-lzw,jpeg-q95,jpeg-q95-444,jpeg-q75,jp2-lossless,webp-q90,npy,npy-files,hdf5,hdf5-gzip,zarr,zarr-zstd,wds-jpeg-q95}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$SECONDS
step() { echo "demo: [$1/6, $((SECONDS - START)) s] $2"; }

step 1 "the dataset"
if [[ -n "${DATA:-}" ]]; then
  SRC=$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")
  echo "demo: using the CIFAR-10 archive $SRC"
else
  SRC="$OUT/data/cifar-10-python.tar.gz"
  if [[ ! -f "$SRC" ]]; then
    echo "demo: no DATA= given; generating a small synthetic dataset in the CIFAR-10 python archive format ($TRAIN train, $TEST test images): $SRC"
    python -m testdata.datagen cifar10 --out "$SRC" --train "$TRAIN" --test "$TEST"
  else
    echo "demo: reusing the generated CIFAR-10-format archive $SRC"
  fi
fi

# A private Ray head on loopback. Token authentication is off for this local head only
# (DESIGN section 10); real clusters keep it on.
export RAY_AUTH_MODE=disabled
port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GCS_PORT=$(port); DASH_PORT=$(port)
RAY_LOG="$OUT/ray-head.log"
# Every port chosen free, so a Ray already running on this machine cannot collide
# (the dashboard agent's default port would).
setsid ray start --head --block --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --include-dashboard true \
  --dashboard-agent-listen-port "$(port)" --dashboard-agent-grpc-port "$(port)" \
  --metrics-export-port "$(port)" --runtime-env-agent-port "$(port)" \
  --ray-client-server-port "$(port)" \
  --num-cpus "$(nproc)" --temp-dir "/tmp/ray-demo-$$" >"$RAY_LOG" 2>&1 &
RAY_PID=$!
stop_ray() {
  if kill -0 "$RAY_PID" 2>/dev/null; then
    kill -TERM -- "-$RAY_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$RAY_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$RAY_PID" 2>/dev/null || true
  fi
}
trap stop_ray EXIT
export RAY_ADDRESS="http://127.0.0.1:$DASH_PORT"
echo "demo: waiting for the local Ray head (log: $RAY_LOG)"
for _ in $(seq 1 120); do
  if ray job list --address "$RAY_ADDRESS" >/dev/null 2>&1; then break; fi
  kill -0 "$RAY_PID" 2>/dev/null || { echo "demo: the Ray head did not start; see $RAY_LOG" >&2; exit 1; }
  sleep 1
done

STORE="$OUT/store"; RESULTS="$OUT/results"; CACHE="$OUT/cache"
step 2 "convert: ray job submit --working-dir . -- python prep/convert.py ... (progress below)"
submit() {
  ray job submit --address "$RAY_ADDRESS" --working-dir . -- \
    python prep/convert.py --source cifar10 --src "$SRC" --dst "$STORE" --name cifar10 \
    --formats "$FORMATS" --results "$RESULTS"
}
# The head answers before its job agent is up; retry only that refusal.
for attempt in $(seq 1 30); do
  if submit 2>"$OUT/submit.err"; then break; fi
  if ! grep -q "No available agent" "$OUT/submit.err" || [[ $attempt == 30 ]]; then
    cat "$OUT/submit.err" >&2; exit 1
  fi
  sleep 2
done
stop_ray
trap - EXIT

node-agent loaders
step 3 "train every loader x format pair that runs here (node-agent matrix)"
node-agent matrix --store "$STORE" --dataset cifar10 --cache "$CACHE" --results "$RESULTS" \
  --epochs "$EPOCHS" --batch-size 128 --workers 2 --model convnet
if [[ ",$FORMATS," == *",wds-jpeg-q95,"* ]]; then
  step 4 "stream the packed tars from the store instead of caching (node-agent run --no-cache)"
  node-agent run --store "$STORE" --dataset cifar10 --format wds-jpeg-q95 --loader packed \
    --no-cache --cache "$CACHE" --results "$RESULTS" --epochs "$EPOCHS" --batch-size 128 \
    --workers 2 --model convnet
fi
# Loader throughput alone (no model), each step standing in for a 5 ms accelerator step.
step 5 "loader throughput alone (node-agent matrix --bench)"
node-agent matrix --bench --emulate-step-ms 5 --store "$STORE" --dataset cifar10 \
  --cache "$CACHE" --results "$RESULTS" --epochs "$EPOCHS" --batch-size 128 --workers 2
step 6 "the report (node-agent report)"
node-agent report --results "$RESULTS" --out "$OUT/report"
echo "demo: done in $((SECONDS - START)) s; tables, CSV and charts are in $OUT/report"
if [[ -f "$OUT/report/report.html" ]]; then
  echo "demo: open $OUT/report/report.html"
else
  echo "demo: the report is $OUT/report/report.md"
fi
