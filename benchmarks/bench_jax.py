"""megalodon-jax's training step (forward + backward, no optimizer) at the mega200M shape, bf16 compute, batch 1:
the JAX port that issue 11 compares against. bench_gpu.py runs it in a process of its own (JAX and PyTorch must not
share the GPU's memory pools); it also runs alone:

    python benchmarks/bench_jax.py --length 4096 --repeats 3      # prints one JSON line

Needs megalodon-jax 0.2.2 and the equinox release it supports (benchmarks/prepare_device_wheels.sh).
"""

from __future__ import annotations

import argparse
import json
import time


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
