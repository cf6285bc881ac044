#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the pure-Python wheels that benchmarks/gpu_session.sh installs on the
# device machine (which has no network): megalodon-jax and the equinox release it supports, for bench_gpu.py's
# comparison row (the device's image has jax, jaxtyping and wadler-lindig, and its own equinox). They are installed
# into a folder of their own that only the megalodon-jax process sees, so the image's packages stay as they are.
# The device runs Python 3.12. Pass .device-wheels in the device tool's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .device-wheels \
    megalodon-jax==0.2.2 equinox==0.13.8
ls -l .device-wheels
