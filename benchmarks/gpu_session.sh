#!/usr/bin/env bash
# The one prepared run for a session that is lent a GPU (15 minutes of device time, machine start included):
#   1. the tests that need CUDA (kernel parity against the float64 references, graph-captured decode, no host
#      syncs in a decode step), in at most 150 s;
#   2. benchmarks/bench_gpu.py: parity, the training table, decode, compiled training, megalodon-jax, a profile,
#      most wanted first, told to start nothing new 75 s before SESSION_SECONDS (default 560: the device tool's
#      600 s per call, less a margin) so that it ends on its own with its results written.
# Everything lands under $OUT (the device tool brings it back). Run from the repository root:
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh
# The device has torch, triton, jax and pytest but no network: wheels that must travel with the tree (megalodon-jax
# and equinox for the comparison row, from benchmarks/prepare_device_wheels.sh) go in .device-wheels/, which git
# ignores, so name it in the device tool's carry list (see docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-gpu-results}
SESSION_SECONDS=${SESSION_SECONDS:-560}
mkdir -p "$OUT"
export PYTHONPATH=src
export PYTHONUNBUFFERED=1

if compgen -G ".device-wheels/*.whl" > /dev/null; then  # for the megalodon-jax process only (bench_gpu.py)
    export MEGALODON_JAX_SITE=/tmp/megalodon-jax-site
    python -m pip install --no-deps --no-index --quiet --target "$MEGALODON_JAX_SITE" .device-wheels/*.whl \
        > "$OUT/pip.log" 2>&1 || echo "installing .device-wheels failed (see pip.log)"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

echo "== tests on CUDA =="
# -m cuda: the tests that run on the GPU when there is one (requires_cuda, and the Triton kernel tests)
timeout 150 python -m pytest -q -p no:xdist -p no:cacheprovider -rs -m cuda tests 2>&1 | tail -40 \
    | tee "$OUT/gpu-tests.txt"

left=$((SESSION_SECONDS - SECONDS))
echo "== bench_gpu.py ($left s left) =="
timeout "$left" python benchmarks/bench_gpu.py --out "$OUT" --deadline $((left - 75)) 2>&1 | tee "$OUT/bench_gpu.md"
