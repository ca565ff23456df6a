#!/bin/bash
# The GPU checklist in one command, for a lent GPU machine (or any CUDA node): installs the wheels
# carried in $WHEELS (default .whl/) into /tmp/site when there are any, records the GPU and the
# versions, runs bench/gpu_check.py under a budget, and leaves env.txt, gpu_check.json,
# gpu_check.profile.txt and gpu_check.log in $OUT (default /tmp/hydralm-gpu-check).
#   bash bench/gpu_run.sh [BUDGET_S [gpu_check.py options...]]     e.g. bash bench/gpu_run.sh 420 --skip compile
# docs/gpu.md says how to prepare .whl/ and call it on the device machine.
set -u -o pipefail
budget=${1:-420}; shift || true
out=${OUT:-/tmp/hydralm-gpu-check}; wheels=${WHEELS:-.whl}
mkdir -p "$out"; start=$(date +%s)
if compgen -G "$wheels/*.whl" > /dev/null; then  # what the image lacks (hydra, omegaconf, datasets, torchao...)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export HYDRALM_CACHE=${HYDRALM_CACHE:-/tmp/hydralm-cache}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 - <<'PY'
import importlib.metadata as metadata
import torch
def version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
print("versions: cuda", torch.version.cuda, *(f"{p} {version(p)}" for p in (
    "torch", "transformers", "hydra-core", "omegaconf", "datasets", "torchao", "flash-attn")))
PY
  echo "setup $(( $(date +%s) - start )) s"; } 2>&1 | tee "$out/env.txt"
python3 bench/gpu_check.py --out "$out/gpu_check.json" --budget-s "$budget" "$@" 2>&1 | tee "$out/gpu_check.log"
status=$?
echo "total $(( $(date +%s) - start )) s (checklist exit $status)"
exit $status
