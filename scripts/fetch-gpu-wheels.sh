#!/usr/bin/env bash
# Download the wheels scripts/gpu-check.sh needs on an offline CUDA 13 / Python 3.12 GPU
# machine into .whl/ (git-ignored), split the large ones and group them for transfer.
#
#   bash scripts/fetch-gpu-wheels.sh            # download, split, group
#   DRY_RUN=1 bash scripts/fetch-gpu-wheels.sh  # resolve, check the list, download nothing
#
# The GPU machine's own packages are listed in scripts/gpu-machine-packages.txt (torch,
# torchvision, cupy-cuda13x, cuda-toolkit, nvidia-cufile, cuda-pathfinder, numpy, ...);
# brought here are DALI, kvikio and what they need beyond that. The dry run resolves
# TOP (nvidia-dali-cuda130, kvikio-cu13) for CPython 3.12 / manylinux x86-64 with
# `pip install --dry-run --report`, subtracts the machine's packages, and fails when
# WHEELS misses one. cuda-pathfinder (libkvikio-cu13 needs it) is on the machine but
# brought too, pinned to what the resolver picks, since the machine's version is not
# recorded. Override the list with WHEELS="name==version ...".
#
# Transfers to the machine are capped (about 64 MiB per call), so wheels over 50 MB are
# split into NAME.whl.part-aa, -ab, ... (`split -b 50M`) and every file is placed in one of
# .whl/batch-N/ folders of at most BATCH_MIB (60) MiB. Carry one batch per call:
#   calls 1..N-1:  carry .whl/batch-K,  run `bash scripts/gpu-check.sh --stash`
#   last call:     carry .whl/batch-N,  run `bash scripts/gpu-check.sh`
# gpu-check.sh joins the parts (`cat`) and installs everything with
# `pip install --no-index --no-deps --target`. The machine must stay warm between calls.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
BATCH_MIB=${BATCH_MIB:-60}
PYVER=${PYVER:-3.12}
TOP=${TOP:-"nvidia-dali-cuda130==2.4.0 kvikio-cu13==26.10.0"}
WHEELS=${WHEELS:-"
cuda-pathfinder==1.9.1
nvidia-dali-cuda130==2.4.0
nvidia-nvimgcodec-cu13==0.9.0.20
nvidia-nvjpeg==13.3.2.43
nvidia-nvjpeg2k-cu13==0.11.0.51
nvidia-nvtiff-cu13==0.8.0.82
nvidia-libnvcomp-cu13==5.3.0.16
astunparse==1.6.3
gast==0.7.0
libcst==1.9.0
makefun==1.16.0
nvtx==0.2.17
optree==0.20.0
kvikio-cu13==26.10.0
libkvikio-cu13==26.10.0
rapids-logger==0.3.0
"}
PLATFORMS=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux2010_x86_64 \
         manylinux_2_12_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

if [[ -n "${DRY_RUN:-}" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # shellcheck disable=SC2086 - TOP is a list of requirements
  "$PY" -m pip install -q --dry-run --ignore-installed --report "$tmp/report.json" \
      --target "$tmp/t" --python-version "$PYVER" --implementation cp \
      --abi "cp${PYVER/./}" --abi abi3 --abi none "${PLATFORMS[@]}" --only-binary=:all: $TOP \
      2> >(grep -v "is ignored: it is neither" >&2)
  "$PY" - "$tmp/report.json" scripts/gpu-machine-packages.txt "$WHEELS" <<'EOF'
"""What the resolution needs beyond the machine's packages, against the WHEELS list."""
import json, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

report, machine_file, wheels = sys.argv[1:4]
machine = {norm(l) for l in open(machine_file).read().split("\n") if l and not l.startswith("#")}
listed = dict(w.split("==") for w in wheels.split())
listed = {norm(k): v for k, v in listed.items()}
missing = []
print(f"resolved for CPython, manylinux x86-64 ({len(machine)} packages already on the machine):")
for item in json.load(open(report))["install"]:
    name, version = norm(item["metadata"]["name"]), item["metadata"]["version"]
    if name in listed:
        state = "brought" if listed[name] == version else f"brought as {listed[name]} (MISMATCH)"
    elif name in machine:
        state = "on the machine"
    else:
        state = "MISSING from WHEELS"
    if "MISSING" in state or "MISMATCH" in state:
        missing.append(name)
    print(f"  {name}=={version}: {state}")
print("complete: every dependency is on the machine or brought" if not missing
      else f"incomplete: {', '.join(missing)}")
sys.exit(1 if missing else 0)
EOF
  exit $?
fi

mkdir -p "$DEST/download"
# One pip call per wheel: pure-Python ones have no platform tag, and --no-deps keeps the
# set to exactly this list (one version of each, as pip install --no-deps needs).
for w in $WHEELS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
      --implementation cp "${PLATFORMS[@]}" -d "$DEST/download" "$w"
done

"$PY" - "$DEST" "$BATCH_MIB" <<'EOF'
"""Split wheels over 50 MB and pack all files into batch folders of at most N MiB."""
import shutil, subprocess, sys
from pathlib import Path

dest, limit = Path(sys.argv[1]), int(sys.argv[2]) << 20
download = dest / "download"
for old in dest.glob("batch-*"):
    shutil.rmtree(old)
pieces = []
for wheel in sorted(download.glob("*.whl")):
    if wheel.stat().st_size > 50_000_000:
        subprocess.run(["split", "-b", "50M", str(wheel), f"{wheel}.part-"], check=True)
        pieces += sorted(download.glob(f"{wheel.name}.part-*"))
        wheel.unlink()
    else:
        pieces.append(wheel)
batches: list[list[Path]] = []
sizes: list[int] = []
for piece in sorted(pieces, key=lambda p: p.stat().st_size, reverse=True):  # first fit
    size = piece.stat().st_size
    for k, used in enumerate(sizes):
        if used + size <= limit:
            batches[k].append(piece); sizes[k] += size
            break
    else:
        batches.append([piece]); sizes.append(size)
for k, (files, used) in enumerate(zip(batches, sizes), start=1):
    folder = dest / f"batch-{k}"
    folder.mkdir()
    for f in files:
        f.rename(folder / f.name)
    print(f"{folder}: {len(files)} files, {used / 2**20:.1f} MiB")
download.rmdir()
print(f"{len(batches)} batches: carry one per call; --stash for all but the last "
      "(see the header of this script)")
EOF
