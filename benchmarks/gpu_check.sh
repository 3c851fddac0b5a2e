#!/usr/bin/env bash
# The GPU path, checked in one go: the main job and the test suite on a CUDA machine, each timed.
# Usage: OUT=<folder> bash benchmarks/gpu_check.sh   (logs and the main job's JSON land in $OUT)
# torchattacks (the parity tests) may be supplied as a wheel in .whl/; everything else must be installed.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    $PY -c "import torch, torchvision, sklearn; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'torchvision', torchvision.__version__, 'sklearn', sklearn.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

start=$(date +%s)
timeout "${MAIN_JOB_LIMIT:-200}" $PY reproduce.py 2>&1 | tee "$OUT/main_job.log"
echo "main job: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
find runs_synthetic \( -name report.json -o -name results.json \) | head -4 | while read -r f; do cp "$f" "$OUT/$(basename "$f")"; done

start=$(date +%s)
timeout "${TEST_LIMIT:-330}" $PY -m pytest -q -p no:cacheprovider --durations=15 2>&1 | tee "$OUT/pytest.log"
echo "test suite: rc ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
