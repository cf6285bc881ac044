#!/usr/bin/env bash
# The whole long-context suite at its small settings, in two lanes of one thread each: these models are small
# enough that two single-thread processes do about 1.4x the work of one process on two threads (measured here).
# Results: runs/long_context/*/results.json and table.md; plots: docs/images/; each lane's log beside them.
# An interrupted suite resumes: finished models and results are reused.
#   bash benchmarks/long_context/run_all.sh
# Timed on an idle 2-core machine: docs/long-context.md, "Running the suite".
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
RUNS=${LONG_CONTEXT_RUNS:-../../runs/long_context}
mkdir -p "$RUNS"
step() {  # one experiment with its clock time, so a timed suite shows where the time goes
    local started=$SECONDS
    "$PY" "$@" --threads 1
    echo "== $* : $((SECONDS - started)) s (suite so far $SECONDS s)"
}
# Lane A starts on synthetic tasks while lane B makes the corpora and tokenizers, so that the two never write
# the same data files at once. Both lanes end with half of the equal-wall-time runs, so every one of those runs
# meets the same load (two single-thread processes) and the Megalodon and Llama of a seed run back to back.
lane_a() {
    step memory.py
    step passkey.py
    step listops.py
    step head_to_head.py --phase walltime --seconds 60 --corpora shakespeare
}
lane_b() {
    step head_to_head.py --phase tokens
    step extrapolation.py
    step head_to_head.py --phase walltime --seconds 60 --corpora austen
}
lane_a > "$RUNS/lane-a.log" 2>&1 & a=$!
lane_b > "$RUNS/lane-b.log" 2>&1 & b=$!
status=0
wait $a || { status=$?; echo "lane A failed; the end of $RUNS/lane-a.log:"; tail -20 "$RUNS/lane-a.log"; }
wait $b || { status=$?; echo "lane B failed; the end of $RUNS/lane-b.log:"; tail -20 "$RUNS/lane-b.log"; }
grep -h "^== " "$RUNS/lane-a.log" "$RUNS/lane-b.log" | sed 's/^/lane: /' || true
[ $status -eq 0 ] || exit $status
step head_to_head.py --phase walltime --seconds 60   # both corpora's runs (already trained) in one table
echo "suite finished in $SECONDS s"
