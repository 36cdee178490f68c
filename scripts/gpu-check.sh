#!/usr/bin/env bash
# The one command to run on a GPU machine (see GPU.md in the team notes):
#
#   bash scripts/gpu-check.sh            install brought-along wheels, generate and convert
#                                        a small dataset, run the GPU tests and one short
#                                        epoch of every GPU loader, print one line per run
#   bash scripts/gpu-check.sh --stash    only copy .whl/ into the wheel stash and exit
#                                        (for wheels that travel in several calls)
#   bash scripts/gpu-check.sh --plan [--limit-s N]
#                                        print the step plan against a time limit (worst
#                                        case: every step uses its whole timeout), run nothing
#   bash scripts/gpu-check.sh --limit-s N   run with N seconds in all (default 540)
#
# Every step runs under `timeout`, derived from the time left minus what the summary
# needs, so the script ends inside its limit and the summary always prints.
#
# Offline: nothing is fetched. Wheels come from .whl/ (made by scripts/fetch-gpu-wheels.sh,
# files over 50 MB split into .part-* pieces) and from the stash that earlier --stash
# calls filled on this machine; parts are joined here. With no wheels it runs with what
# is installed, and loaders whose packages are missing say so in their result line.
#
# Logs: $OUT when set (the device tool returns what lands there), else ./gpu-check-out/.
# Budget: about 10 minutes on a 16-core H200 machine; GPU_CHECK_BUDGET_S (default 540)
# caps the whole script, the full `pytest -m gpu` gets whatever is left.
# Knobs: CIFAR_TRAIN (10000), CIFAR_TEST (2000), PHOTOS_PER_CLASS (100), MAX_STEPS (30),
#        WORKERS (8), RUN_TIMEOUT_S (45), PYTHON (python3), GPU_CHECK_WORK (scratch dir).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
PLAN=0
MODE=run
while (( $# )); do
  case $1 in
    --plan) PLAN=1 ;;
    --stash) MODE=stash ;;
    --limit-s) BUDGET=${2:?--limit-s needs seconds}; shift ;;
    *) echo "gpu-check: unknown argument $1 (use --plan, --limit-s N, --stash)" >&2; exit 2 ;;
  esac
  shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu-check: --limit-s needs whole seconds, got $BUDGET" >&2; exit 2; }
SUMMARY_RESERVE_S=20   # the summary step's own timeout, kept back from every other step
MIN_STEP_S=5           # a step with less than this left is skipped, not started
ELAPSED=0              # --plan: the simulated clock
exec 3>&1              # the plan goes here, whatever a step's output is redirected to
PY=${PYTHON:-python3}
LOGS=${OUT:-$ROOT/gpu-check-out}
STASH=${FORMATLAB_WHEEL_STASH:-/tmp/formatlab-wheels}
SITE=${FORMATLAB_SITE:-/tmp/formatlab-site}
WORK=${GPU_CHECK_WORK:-/tmp/formatlab-gpu-check}
CIFAR_TRAIN=${CIFAR_TRAIN:-10000}
CIFAR_TEST=${CIFAR_TEST:-2000}
PHOTOS_PER_CLASS=${PHOTOS_PER_CLASS:-100}
MAX_STEPS=${MAX_STEPS:-30}
WORKERS=${WORKERS:-8}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-45}
# loader:format pairs, each run on both datasets
PAIRS=${PAIRS:-"cupy:npy kvikio:npy kvikio:npy-files dali:jpeg-q95 dali_gds:npy-files nvjpeg:jpeg-q95"}

(( PLAN )) && LOGS=$(mktemp -d)
mkdir -p "$LOGS"
LOG=$LOGS/gpu-check.log          # everything, in order
RUNS_LOG=$LOGS/runs.log          # every node-agent run's own output
PYTEST_LOG=$LOGS/pytest.log
SUMMARY=$LOGS/summary.txt
STATUS=$LOGS/run-status.tsv      # dataset, loader, format, exit code, last line
: >"$LOG"; : >"$RUNS_LOG"; : >"$PYTEST_LOG"
export PYTHONUNBUFFERED=1

elapsed() { if (( PLAN )); then echo "$ELAPSED"; else echo $(( $(date +%s) - START )); fi; }
log() { echo "[gpu-check $(date +%H:%M:%S) +$(elapsed)s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - $(elapsed) )); }

# step NAME NOMINAL_S CMD...: run CMD under a timeout of min(NOMINAL_S, time left minus
# the summary's reserve); skip it when less than MIN_STEP_S would be left. In --plan
# mode print the step and advance the simulated clock by its whole timeout instead.
# Sets STEP_RC (124: timed out or skipped).
step() {
  local name=$1 nominal=$2; shift 2
  local t=$(( $(left) - SUMMARY_RESERVE_S ))
  (( t > nominal )) && t=$nominal
  if (( t < MIN_STEP_S )); then
    log "skip $name: $(( t < 0 ? 0 : t ))s left before the summary"
    STEP_RC=124; return 0
  fi
  if (( PLAN )); then
    printf 'plan\t%s\tstart=%s\ttimeout=%s\tend=%s\n' "$name" "$ELAPSED" "$t" "$(( ELAPSED + t ))" >&3  # the terminal, even where the step's output goes to a log
    ELAPSED=$(( ELAPSED + t )); STEP_RC=0; return 0
  fi
  # bash -c so that exported functions run under the timeout like commands do
  timeout --kill-after=5 "$t" bash -c '"$@"' _ "$@"
  STEP_RC=$?
  (( STEP_RC == 124 || STEP_RC == 137 )) && log "  $name timed out after ${t}s"
  return 0
}

stash_wheels() {
  [[ -d .whl ]] || return 0
  mkdir -p "$STASH"
  find .whl -type f \( -name '*.whl' -o -name '*.whl.part-*' \) -exec cp -f {} "$STASH"/ \;
}

if [[ $MODE == stash ]]; then
  stash_wheels
  log "stashed wheels in $STASH:"
  ls -la "$STASH" | tee -a "$LOG"
  exit 0
fi

# ------------------------------------------------------------------ 1. wheels
install_wheels_quietly() { install_wheels; echo "$PYTHONPATH" >"$LOGS/.pythonpath"; }
install_wheels() {
  stash_wheels
  if ! compgen -G "$STASH/*.whl*" >/dev/null; then
    log "no brought-along wheels (.whl/ or $STASH): using what is installed"
    return 0
  fi
  local joined=$STASH/joined
  rm -rf "$joined"; mkdir -p "$joined"
  local base
  for part in "$STASH"/*.whl.part-*; do
    [[ -e "$part" ]] || continue
    base=$(basename "${part%.part-*}")
    [[ -e "$joined/$base" ]] && continue
    cat "$STASH/$base".part-* >"$joined/$base"   # the glob sorts aa, ab, ... in order
  done
  for whl in "$STASH"/*.whl; do
    [[ -e "$whl" ]] && cp -f "$whl" "$joined/"
  done
  for whl in "$joined"/*.whl; do
    if ! "$PY" -c "import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip() is not None)" \
        "$whl" 2>>"$LOG"; then
      log "incomplete wheel (missing parts?), skipped: $(basename "$whl")"
      rm -f "$whl"
    fi
  done
  log "installing $(ls "$joined" | wc -l) wheels into $SITE"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$joined"/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "pip install of the brought-along wheels failed (see $LOG); going on without them"
  fi
}
export -f stash_wheels install_wheels install_wheels_quietly log elapsed left
export START PLAN ELAPSED BUDGET LOG LOGS STASH SITE PY
step wheels 60 install_wheels_quietly
[[ -s $LOGS/.pythonpath ]] && PYTHONPATH=$(cat "$LOGS/.pythonpath")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ------------------------------------------------------------------ 2. the machine
machine_info() {
  nvidia-smi -L 2>&1 || true
  "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("torchvision", "cupy", "kvikio", "nvidia.dali"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "not importable:", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
from node.loaders import gds
print("nvidia-fs reads:", gds.nvfs_read_counters())
obs = gds.kvikio_observation(before=None, after=None, cufile_bytes=None, fallback_files=None)
print("kvikio/cuFile now:", obs)
print("io_path a kvikio run would get without counters:", gds.decide_io_path(obs))
EOF
  "$PY" -m node.cli loaders
}
export -f machine_info
export PYTHONPATH
log "machine"
step machine 30 machine_info > >(tee -a "$LOG") 2>&1  # not a pipe: step must run in this shell

# ------------------------------------------------------------------ 3. data
log "generating data and converting it to npy, npy-files, jpeg-q95 (no Ray: --address inline)"
(( PLAN )) || { rm -rf "$WORK"; mkdir -p "$WORK/raw"; }
STORE=$WORK/store; CACHE=$WORK/cache; RESULTS=$WORK/results
DATA_OK=1
step datagen-cifar 40 "$PY" -m testdata.datagen cifar10 --out "$WORK/raw/cifar-10-python.tar.gz" \
    --train "$CIFAR_TRAIN" --test "$CIFAR_TEST" >>"$LOG" 2>&1; (( STEP_RC )) && DATA_OK=0
step datagen-photos 40 "$PY" -m testdata.datagen image-folder --out "$WORK/raw/photos" --classes 4 \
    --train "$PHOTOS_PER_CLASS" --size 640x560 --no-odd-files >>"$LOG" 2>&1; (( STEP_RC )) && DATA_OK=0
step convert-cifar 60 "$PY" prep/convert.py --source cifar10 \
    --src "$WORK/raw/cifar-10-python.tar.gz" --dst "$STORE" --name cifar \
    --formats npy,npy-files,jpeg-q95 --address inline >>"$LOG" 2>&1; (( STEP_RC )) && DATA_OK=0
step convert-photos 60 "$PY" prep/convert.py --source image-folder --src "$WORK/raw/photos" \
    --dst "$STORE" --name photos --size 512 --formats npy,npy-files,jpeg-q95 \
    --address inline >>"$LOG" 2>&1; (( STEP_RC )) && DATA_OK=0
[[ $DATA_OK == 1 ]] || log "data generation or conversion failed or timed out; see $LOG"

# ------------------------------------------------------------------ 4. GPU loader tests
log "pytest -m gpu tests/node/test_gpu_loaders.py"
step pytest-gpu-loaders 90 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    tests/node/test_gpu_loaders.py tests/node/test_dali_packed.py tests/node/test_gds.py tests/node/test_cupy_window.py \
    >>"$PYTEST_LOG" 2>&1
log "  exit $STEP_RC ($(tail -n 1 "$PYTEST_LOG"))"

# ------------------------------------------------------------------ 5. one short epoch per loader
: >"$STATUS"
for dataset in cifar photos; do
  batch=256; [[ $dataset == photos ]] && batch=64
  for pair in $PAIRS; do
    loader=${pair%%:*}; format=${pair#*:}
    log "run $loader x $format on $dataset"
    echo "===== $dataset $loader $format" >>"$RUNS_LOG"
    step "run-$dataset-$loader-$format" "$RUN_TIMEOUT_S" "$PY" -m node.cli run \
        --store "$STORE" --dataset "$dataset" \
        --format "$format" --loader "$loader" --cache "$CACHE" --results "$RESULTS" \
        --epochs 1 --max-steps "$MAX_STEPS" --batch-size "$batch" --workers "$WORKERS" \
        --device cuda --model resnet18 >"$LOGS/run.out" 2>&1
    rc=$STEP_RC
    cat "$LOGS/run.out" >>"$RUNS_LOG" 2>/dev/null
    last=$(grep -v '^\s*$' "$LOGS/run.out" 2>/dev/null | tail -n 1 | tr '\t' ' ' | cut -c1-300)
    (( rc == 124 )) && last="timed out or skipped for time: $last"
    printf '%s\t%s\t%s\t%s\t%s\n' "$dataset" "$loader" "$format" "$rc" "$last" >>"$STATUS"
    log "  exit $rc"
  done
done

# ------------------------------------------------------------------ 6. every GPU test
log "pytest -m gpu (all GPU tests, $(left)s left)"
step pytest-gpu-all "$(left)" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    >>"$PYTEST_LOG" 2>&1
log "  exit $STEP_RC ($(tail -n 1 "$PYTEST_LOG"))"

# ------------------------------------------------------------------ 7. one line per run
if (( PLAN )); then
  printf 'plan\tsummary\tstart=%s\ttimeout=%s\tend=%s\n' "$ELAPSED" "$SUMMARY_RESERVE_S" \
      "$(( ELAPSED + SUMMARY_RESERVE_S ))"
  printf 'plan\ttotal\tlimit=%s\tworst_case_end=%s\n' "$BUDGET" "$(( ELAPSED + SUMMARY_RESERVE_S ))"
  rm -rf "$LOGS"
  exit 0
fi
timeout "$SUMMARY_RESERVE_S" "$PY" - "$RESULTS" "$STATUS" <<'EOF' 2>&1 | tee "$SUMMARY" | tee -a "$LOG"
import csv, os, sys
results, status_file = sys.argv[1], sys.argv[2]
rows = {}
runs = os.path.join(results, "runs")
if os.path.isdir(runs) and os.listdir(runs):
    import pandas as pd
    frame = pd.read_parquet(runs).sort_values("started_at")
    for row in frame.to_dict("records"):
        rows[(row["dataset"], row["loader"], row["format"])] = row  # the latest wins
def num(value, scale=1.0, fmt="{:.2f}"):
    try:
        if value is None or value != value:
            return "-"
        return fmt.format(float(value) * scale)
    except (TypeError, ValueError):
        return "-"
print("dataset  loader     format     img/s     io_path  peak_vram_GiB  data_wait  accel_util  status; io_path evidence")
with open(status_file) as f:
    for dataset, loader, fmt, rc, last in csv.reader(f, delimiter="\t"):
        row = rows.get((dataset, loader, fmt))
        if row is None:
            print(f"{dataset:8} {loader:10} {fmt:10} {'-':>9} {'-':8} {'-':>13} {'-':>10} {'-':>11}  "
                  f"exit {rc}: {last}")
            continue
        status = row.get("status")
        if status != "ok":
            status = f"{status}: {str(row.get('error') or last)[:200]}"
        print(f"{dataset:8} {loader:10} {fmt:10} {num(row.get('throughput_img_s'), fmt='{:,.0f}'):>9} "
              f"{str(row.get('io_path')):8} {num(row.get('peak_vram_bytes'), 1 / 2**30):>13} "
              f"{num(row.get('data_wait_fraction')):>10} {num(row.get('accelerator_utilization')):>11}  "
              f"{status}; {row.get('io_path_evidence') or '-'}")
EOF
log "done in $(( $(date +%s) - START ))s; logs in $LOGS"
