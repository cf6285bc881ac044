"""megalodon-jax's training step (forward + backward, no optimizer) at the mega200M shape, bf16 compute, batch 1:
the JAX port that issue 11 compares against. bench_gpu.py runs it in a process of its own (JAX and PyTorch must not
share the GPU's memory pools); it also runs alone:

    python benchmarks/bench_jax.py --length 4096 --repeats 3      # prints one JSON line

Needs megalodon-jax 0.2.2 and the equinox release it supports (benchmarks/prepare_device_wheels.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable


def train_step_rate(length: int, repeats: int) -> dict:
    """Tokens/s of the jitted value-and-grad step, after one untimed call (the compilation)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from megalodon_jax import MegalodonConfig, MegalodonForCausalLM

    config = MegalodonConfig(vocab_size=32000, model_dim=1024, num_layers=12, num_heads=1, z_dim=256,
                             value_dim=2048, ffn_hidden_dim=2560, chunk_size=2048, norm_num_groups=32,
                             compute_dtype=jnp.bfloat16)
    model = MegalodonForCausalLM(config, key=jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, length), 0, config.vocab_size)

    def loss_fn(model, ids):
        logits, _ = model(ids)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    step = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))
    jax.block_until_ready(step(model, ids))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(step(model, ids))
    return {"tokens_per_s": length * repeats / (time.perf_counter() - start), "jax": jax.__version__,
            "backend": jax.default_backend()}


def section(lengths: list[int], repeats: int, out_of_time: Callable[[str], bool], deadline: float) -> dict:
    """bench_gpu.py's jax section: this file's training step, each length in a process of its own (nothing of JAX
    is imported here). out_of_time(what) says whether to skip a length (and logs the skip); deadline: the
    time.perf_counter() at which a running process is stopped. MEGALODON_JAX_SITE, where set (gpu_session.sh
    sets it), is a folder of packages (megalodon-jax and the equinox it supports) that only those processes see."""
    from gpu_checks import log

    log("## megalodon-jax (mega200M shape, bf16 compute)\n")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    site = os.environ.get("MEGALODON_JAX_SITE")
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    probe = subprocess.run([sys.executable, "-c", "import megalodon_jax"], capture_output=True, text=True, env=env)
    if probe.returncode:
        log("megalodon-jax does not import here; skipped (docs/gpu.md says how to carry its wheel): "
            f"{(probe.stderr.strip().splitlines() or ['?'])[-1][:200]}\n")
        return {}
    results = {}
    log("| L | megalodon-jax tok/s |\n|---|---|")
    for length in lengths:
        if out_of_time(f"megalodon-jax at {length}"):
            continue
        command = [sys.executable, __file__, "--length", str(length), "--repeats", str(repeats)]
        limit = None if deadline == float("inf") else max(60.0, deadline - time.perf_counter())
        try:
            out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=limit)
        except subprocess.TimeoutExpired:
            results[length] = {"error": "timed out at --deadline"}
            log(f"| {length:,} | timed out |")
            continue
        if out.returncode:
            results[length] = {"error": out.stderr.strip().splitlines()[-1][:300] if out.stderr else "failed"}
            log(f"| {length:,} | {results[length]['error']} |")
            continue
        results[length] = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"| {length:,} | {results[length]['tokens_per_s']:,.0f} ({results[length]['backend']}) |")
    log()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.length < 2 or args.repeats < 1:
        parser.error("--length must be >= 2 and --repeats >= 1")
    print(json.dumps(train_step_rate(args.length, args.repeats)))


if __name__ == "__main__":
    main()
