#!/usr/bin/env bash
# Install formatlab from a checkout into the current Python environment, with the build of
# torch that fits the machine. Used by deploy/docker/Dockerfile.*, deploy/ray/cluster.yaml and
# the Slurm steps of deploy/README.md.
#
#   bash deploy/pip-install.sh VARIANT [REPO_DIR]
#
# VARIANT  cpu       CPU builds of torch/torchvision (a plain `pip install .` would pull
#                    the multi-GB CUDA build onto machines that have no GPU)
#          gpu-cu13  CUDA 13 torch + the pyproject extra gpu-cu13 (CuPy, DALI, kvikio)
#          gpu-cu12  CUDA 12 torch + the pyproject extra gpu-cu12
# REPO_DIR the checkout to install (default: .)
# TORCH_INDEX_URL overrides the index the pinned torch/torchvision come from.
#
# The torch and torchvision versions are read from pyproject.toml, so they never drift
# from what the project pins.
set -euo pipefail

variant=${1:?usage: pip-install.sh cpu|gpu-cu12|gpu-cu13 [REPO_DIR]}
repo=${2:-.}
python=${PYTHON:-python}

case "$variant" in
  cpu)      index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}; target="$repo" ;;
  gpu-cu13) index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu130}; target="${repo}[gpu-cu13]" ;;
  gpu-cu12) index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}; target="${repo}[gpu-cu12]" ;;
  *) echo "pip-install.sh: unknown variant '$variant' (cpu, gpu-cu12, gpu-cu13)" >&2; exit 2 ;;
esac

# The torch/torchvision requirement strings exactly as pyproject.toml pins them.
mapfile -t pins < <("$python" - "$repo/pyproject.toml" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for dep in deps:
    if re.split(r"[\s<>=!~\[;]", dep, maxsplit=1)[0] in ("torch", "torchvision"):
        print(dep)
PY
)
if [[ ${#pins[@]} -ne 2 ]]; then
  echo "pip-install.sh: expected torch and torchvision in $repo/pyproject.toml, found: ${pins[*]:-none}" >&2
  exit 1
fi

"$python" -m pip install --index-url "$index" "${pins[@]}"
# torch is already satisfied (a local label such as +cpu matches the ==pin), so this only
# adds formatlab and its other dependencies from the default index.
"$python" -m pip install "$target"
