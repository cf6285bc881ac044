#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the pure-Python wheels that benchmarks/gpu_session.sh installs on the
# device machine (which has no network): megalodon-jax and what it needs beyond jax, for bench_gpu.py's comparison
# row. The device runs Python 3.12. Pass .device-wheels in the device tool's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .device-wheels \
    megalodon-jax==0.2.2 equinox jaxtyping wadler-lindig
ls -l .device-wheels
