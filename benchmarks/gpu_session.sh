#!/usr/bin/env bash
# The one prepared run for a session that is lent a GPU (15 minutes of device time, machine start included):
#   1. the tests that need CUDA (kernel parity against the float64 references, graph-captured decode, no host
#      syncs in a decode step), in about 2 minutes;
#   2. benchmarks/bench_gpu.py: parity, the training table, megalodon-jax, decode, a profile (about 6-8 minutes).
# Everything lands under $OUT (the device tool brings it back). Run from the repository root:
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh
# The device has torch, triton, jax and pytest but no network: wheels that must travel with the tree (for example
# megalodon-jax and equinox for the comparison row) go in .device-wheels/, which git ignores, so name it in the
# device tool's carry list (see docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=src
export PYTHONUNBUFFERED=1

if compgen -G ".device-wheels/*.whl" > /dev/null; then
    python -m pip install --no-deps --no-index --quiet .device-wheels/*.whl > "$OUT/pip.log" 2>&1 \
        || echo "installing .device-wheels failed (see pip.log)"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

echo "== tests on CUDA =="
timeout 180 python -m pytest -q -p no:xdist -p no:cacheprovider -rs tests/ops tests/test_model.py \
    tests/inference/test_generate.py tests/baseline 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"

echo "== bench_gpu.py =="
timeout "${BENCH_TIMEOUT:-480}" python benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.md"
