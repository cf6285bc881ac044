#!/usr/bin/env bash
# The whole long-context suite at its small settings, one experiment after another (they share 2 cores).
# Results: runs/long_context/*/results.json and table.md; plots: docs/images/. An interrupted suite resumes:
# finished models and results are reused. The equal-wall-time comparison runs last (wall-clock is noisy).
#   bash benchmarks/long_context/run_all.sh
# Measured: about 4 hours summed over the experiments (2.5 hours of clock time, some side by side) on a 2-core
# machine shared with other jobs (load average 2-8); single runs were up to 25x faster when it was quiet, so an
# idle machine takes far less, but that has not been measured (docs/long-context.md, "Timing").
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
$PY memory.py
$PY passkey.py
$PY listops.py
$PY head_to_head.py --phase tokens
$PY extrapolation.py
$PY head_to_head.py --phase walltime --seconds 60
