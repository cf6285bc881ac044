"""Shared pieces of the trainer tests (tests/training): a tiny byte-level fp32 run and strict metrics reading."""

import json


def run_values(corpus, tmp_path, **overrides) -> dict:
    """The options of a tiny run (one thread, so that runs in different processes agree to the bit)."""
    values = dict(preset="tiny", data=str(corpus), data_dir=str(tmp_path / "data"), tokenizer="byte", seq_len=64,
                  batch_size=4, grad_accum=2, max_steps=8, warmup_steps=3, eval_every=0, checkpoint_every=4,
                  log_every=1, dtype="fp32", sample_tokens=8, model={"chunk_size": 16}, lr=3e-3, threads=1)
    values.update(overrides)
    return values


def strict_records(path) -> list[dict]:
    """The records of a metrics.jsonl file, refusing the NaN/Infinity literals that strict JSON readers reject."""
    def refuse(literal):
        raise ValueError(f"{path} holds the non-JSON literal {literal}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in strict_records(run_dir / "metrics.jsonl") if "loss" in r]
