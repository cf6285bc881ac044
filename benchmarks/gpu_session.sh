#!/usr/bin/env bash
# The prepared run for a session that is lent a GPU (15 minutes of device time, machine start included), in two
# parts so that the first one's results come back, and can be read, before the second one starts:
#   bash benchmarks/gpu_session.sh 1   the tests that use the GPU (kernel parity against the float64 references,
#                                      compiled training, graph-captured and compiled decode, no host syncs), then
#                                      bench_gpu.py's graphed training table, decode, and eager training table;
#   bash benchmarks/gpu_session.sh 2   bench_gpu.py's compiled blocks inside a graphed step, megalodon-jax,
#                                      the profile (both models, eager and compiled, by kind of kernel),
#                                      compiled training (default mode), the whole model's parity against the
#                                      CPU, compiled training with reduce-overhead, transformers generate(), and
#                                      issue 11's targets from both parts (gpu_targets.py);
#   bash benchmarks/gpu_session.sh all both in one call, which saves a second machine start when the machine would
#                                      go back (idle) before part 1's results could be read;
#   bash benchmarks/gpu_session.sh tuned (after `all`) the kernels' settings picked on this GPU by gpu_tuning.py,
#                                      then the graphed 4K and 16K rows again with them, then with the time left
#                                      the sections `all` ends with (eager table, parity, reduce-overhead, hf);
#   bash benchmarks/gpu_session.sh sweep the CEMA's and the TimestepNorm's kernel tilings (bench_cema.py --chunks
#                                      and --prefetch,
#                                      bench_timestep_norm.py --scan-tiles) and the attention's query blocks
#                                      (bench_attention.py --blocks), for the minutes left after `all`.
# A Triton kernel whose own tests fail in part 1 is turned off (MEGALODON_DISABLE_TRITON) for part 1's benchmark,
# which says so; run part 2 with the variable it prints.
# Each part stops starting new work 60 s before SESSION_SECONDS (default 330: two parts and a machine start fit in
# 15 minutes), so that it ends on its own with its results written. Everything lands under $OUT (the device tool
# brings it back). Run from the repository root:
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh 1
# The device has torch, triton, jax and pytest but no network: wheels that must travel with the tree (megalodon-jax
# and equinox for the comparison row, from benchmarks/prepare_device_wheels.sh) go in .device-wheels/, which git
# ignores, so name it in the device tool's carry list (see docs/gpu.md).
set -uo pipefail
PART=${1:-1}
OUT=${OUT:-gpu-results}
SESSION_SECONDS=${SESSION_SECONDS:-330}
PYTHON=${PYTHON:-python3}  # the device's python3 is the one that holds PyTorch
mkdir -p "$OUT"
export PYTHONPATH=src
export PYTHONUNBUFFERED=1

# bench_gpu.py on the given sections, told to finish inside what is left of SESSION_SECONDS. Each call is a process
# of its own that adds to the part's results file and log: the CUDA graphs' sections, which had never run on a GPU
# when this was written, go first and alone, so that a CUDA error they leave behind (sticky in a process) cannot
# cost the sections after them their figures.
# An optional second argument keeps that many seconds for the calls after this one (their own sections' needs),
# as long as this one still gets 100 s: its sections come first because they are wanted more.
bench() {
    local left=$((SESSION_SECONDS - SECONDS))
    local keep=${2:-0}
    if [ $((left - keep)) -lt 100 ]; then
        keep=$((left > 100 ? left - 100 : 0))
    fi
    left=$((left - keep))
    echo "== bench_gpu.py --sections $1 ($left s for it) ==" | tee -a "$OUT/bench_gpu_part$PART.md"
    if [ "$left" -le 60 ]; then  # (timeout 0 would mean no limit at all)
        echo "skipped: no time left in SESSION_SECONDS" | tee -a "$OUT/bench_gpu_part$PART.md"
        return
    fi
    # shellcheck disable=SC2086  # BENCH_ARGS: extra options, e.g. "--device cpu" for a dry run without a GPU
    timeout "$left" "$PYTHON" benchmarks/bench_gpu.py --sections "$1" --out "$OUT" --results-name "results_part$PART.json" \
        --append --deadline $((left - 60)) ${BENCH_ARGS:-} 2>&1 \
        | tee -a "$OUT/bench_gpu_part$PART.md"
}

fresh_part() {  # a part run again into the same $OUT starts its results and log anew
    rm -f "$OUT/results_part$PART.json" "$OUT/bench_gpu_part$PART.md"
}

kernels_that_failed() {  # the Triton ops whose own kernel tests failed or errored in pytest's -vv output $1
    "$PYTHON" - "$1" <<'PY'
import re, sys
ops = {"causal_softmax": "causal_softmax", "cema": "cema,cema_step", "fused": "norm_rows,silu_gate,add_linear",
       "queries_keys": "queries_keys", "static_kv": "static_kv", "timestep_norm": "timestep_norm,timestep_norm_step"}
lines = [line for line in open(sys.argv[1], errors="replace") if "FAILED" in line or "ERROR" in line]
failed = {name for line in lines for name in re.findall(r"tests/ops/test_(\w+?)_triton\.py", line)}
print(",".join(ops[name] for name in sorted(failed) if name in ops))
PY
}

part1() {
    fresh_part
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    echo "== tests on CUDA =="
    # -m cuda: the tests that run on the GPU when there is one (requires_cuda, and the Triton kernel tests). Eight
    # workers share the GPU: one process took over 120 s for a third of them (each compiles its own kernels),
    # eight took 66 s for all (H100, 2026-11-27; since then a compiled graphed step and more kernel cases, hence
    # 150 s). -vv (addopts has -q) into the file: if the timeout stops it, the tests that ran are listed there;
    # --tb=short keeps every failure's cause in it.
    timeout 150 "$PYTHON" -m pytest -n 8 -vv --tb=short -p no:cacheprovider -rfEs --durations=10 -m cuda \
        tests/test_*.py tests/inference tests/baseline tests/hf tests/ops tests/training 2>&1 \
        | tee "$OUT/gpu-tests.txt" | grep -E "FAILED|ERROR|passed|failed" | tail -50
    # A kernel whose own tests failed on this GPU stays off for the benchmark (its PyTorch path runs instead), so
    # that one kernel's fault does not cost the session its figures; part 2 must then run with the same setting.
    failed=$(kernels_that_failed "$OUT/gpu-tests.txt")
    if [ -n "$failed" ]; then
        export MEGALODON_DISABLE_TRITON="${MEGALODON_DISABLE_TRITON:+$MEGALODON_DISABLE_TRITON,}$failed"
        echo "!! kernel tests failed on this GPU: benchmarking with" \
            "MEGALODON_DISABLE_TRITON=$MEGALODON_DISABLE_TRITON (run part 2 with the same)" \
            | tee "$OUT/disabled-kernels.txt"
    fi
    # the decode section took 62 s on the H100: kept for it, unless the tests took so long that the graphed rows
    # (the 4K target's best configuration) would get under 100 s
    bench env,train-graphed 90
    # decode before the eager training table: the decode targets are measured only here, while train-graphed
    # already gives the 4K and 32K rows their best configuration, so eager training is the one to lose to time
    bench decode,train-eager
}

part2() {
    fresh_part
    if compgen -G ".device-wheels/*.whl" > /dev/null; then  # for the megalodon-jax process only (bench_gpu.py)
        export MEGALODON_JAX_SITE=/tmp/megalodon-jax-site
        # the log stays on the device unless the install fails: the tool brings back at most 8 files
        "$PYTHON" -m pip install --no-deps --no-index --quiet --target "$MEGALODON_JAX_SITE" .device-wheels/*.whl \
            > /tmp/pip.log 2>&1 || { echo "installing .device-wheels failed:"; cat /tmp/pip.log; }
    fi
    # The open targets' figures first: the 4K ratio's likely best configuration (compiled blocks in a graphed
    # step) and megalodon-jax's row (91 s on the H100); then the profile, where each model's GPU time goes (its
    # compiled half recompiles both models at 4K, from Inductor's caches, warm by then); then compiled training
    # (part 1's graphed rows measure the 32K target too) and the parity (part 1's tests check the kernels and
    # the model on the GPU already). On the first H100 run this part's sections took 186 s of the about 225 that
    # its deadline leaves, so the last may not start.
    bench env,train-compiled-graphed
    bench jax,profile,train-compiled,parity,train-compiled-graphs,hf
    # the issue's targets from both parts' results (best configuration against best), at the end of this part's
    # log and so of the device tool's output
    "$PYTHON" benchmarks/gpu_targets.py "$OUT"/results_part*.json --tests "$OUT/gpu-tests.txt" 2>&1 \
        | tee -a "$OUT/bench_gpu_part2.md"
}

# At most 8 files come back: nvidia-smi.txt, gpu-tests.txt, disabled-kernels.txt, and per part bench_gpu_partN.md
# and results_partN.json, plus part 2's gzipped profile trace (tuned: six files, the parts tuned and rest).
case "$PART" in
1) part1 ;;
2) part2 ;;
sweep)  # the CEMA's and the TimestepNorm's kernel tilings, the attention's query blocks, the gates' and norms'
        # kernels against torch's ops: about a minute
    {
        "$PYTHON" benchmarks/bench_cema.py --device cuda --shape 1,4096,1024 --dtype bf16 --chunks 32 64 128
        echo
        # at 32K there are 8x the chunks to spread over the GPU: whether the best CHUNK depends on the length
        "$PYTHON" benchmarks/bench_cema.py --device cuda --shape 1,32768,1024 --dtype bf16 --chunks 64 128 256
        echo
        "$PYTHON" benchmarks/bench_cema.py --device cuda --shape 1,4096,1024 --dtype bf16 --prefetch none forward reverse both
        echo
        "$PYTHON" benchmarks/bench_cema.py --device cuda --shape 1,4096,1024 --dtype bf16 --resets --forms steps matrix both
        echo
        "$PYTHON" benchmarks/bench_timestep_norm.py --device cuda --scan-tiles 256,8,4,32 1024,2,4,32 256,8,4,8 64,8,4,64
        echo
        "$PYTHON" benchmarks/bench_timestep_norm.py --device cuda --shape 1,32768,1024 --scan-tiles 256,8,4,32 256,8,4,128
        echo
        "$PYTHON" benchmarks/bench_attention.py --device cuda --blocks 1 2 4 8
        echo
        "$PYTHON" benchmarks/bench_fused.py --device cuda
    } 2>&1 | tee "$OUT/sweeps.md"
    ;;
tuned)  # after `all`, in a second call (within the machine's 30 s idle window, or a fresh start): the kernels'
        # settings picked on this GPU (gpu_tuning.py: at most 60 s of timing), then the open targets' rows again
        # with them, graphed steps at 4K and 16K, both models. A kernel part 1 turned off must be turned off here
        # too: pass its MEGALODON_DISABLE_TRITON. Then, here: gpu_targets.py over all three results files. The
        # graphed rows come first (no compilation: 40 s), then the compiled blocks inside graphed steps.
    fresh_part
    DEFAULT_BENCH_ARGS=${BENCH_ARGS:-}
    # shellcheck disable=SC2086  # TUNE_ARGS: "--device cpu" for a dry run without a GPU, as BENCH_ARGS
    timeout 100 "$PYTHON" benchmarks/gpu_tuning.py --out "$OUT/kernel-settings.json" --deadline 60 ${TUNE_ARGS:-} 2>&1 \
        | tee "$OUT/tuning.md"
    if [ -f "$OUT/kernel-settings.json" ]; then
        BENCH_ARGS="${BENCH_ARGS:-} --kernel-settings $OUT/kernel-settings.json --presets mega200M --lengths 4096 16384"
        bench train-graphed  # first: it compiles nothing, so the time left after it is known
        bench train-compiled-graphed
        BENCH_ARGS=$DEFAULT_BENCH_ARGS
    else
        echo "gpu_tuning.py wrote no settings: nothing to run again" | tee -a "$OUT/tuning.md"
    fi
    # With the time left (on the H200, 2026-11-30, the above took 80 s of 240), with the default settings, what
    # `all` puts last and had no time for there: the eager table (the memory targets and mega1.3B at 32K),
    # the parity, the blocks under reduce-overhead and generate() (REST_SECTIONS: others, for a dry run)
    PART=rest
    fresh_part
    bench "${REST_SECTIONS:-train-eager,parity,train-compiled-graphs,hf}"
    ;;
all)  # both parts in one call, each with its own SESSION_SECONDS; part 1's disabled kernels stay off in part 2
    PART=1
    part1
    PART=2
    SECONDS=0
    part2
    ;;
*)
    echo "usage: OUT=DIR bash benchmarks/gpu_session.sh 1|2|all|tuned|sweep" >&2
    exit 2
    ;;
esac
