#!/usr/bin/env bash
# The whole long-context suite at its small settings, one experiment after another (they share 2 cores).
# Results: runs/long_context/*/results.json and table.md; plots: docs/images/. An interrupted suite resumes:
# finished models and results are reused. The equal-wall-time comparison runs last (wall-clock is noisy).
#   bash benchmarks/long_context/run_all.sh            # about an hour on an idle 2-core machine
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
$PY memory.py
$PY passkey.py
$PY listops.py
$PY head_to_head.py --phase tokens
$PY extrapolation.py
$PY head_to_head.py --phase walltime --seconds 60
