"""benchmarks/model_flops.py: its counts against torch.utils.flop_counter on tiny models of both architectures,
and its causal key count against an explicit loop."""

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_config
from megalodon import Megalodon
from megalodon.baseline import Llama, matched_llama_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import model_flops  # noqa: E402


def forward_flops(model, length: int) -> dict[str, dict[str, int]]:
    """torch's count of one forward pass: {module path: {aten op name: FLOPs}}, "Global" for the whole model.
    SDPA runs its math backend, whose matmuls torch counts on the CPU."""
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(ids)
    return {module: {str(op).split(".")[-1]: flops for op, flops in ops.items()}
            for module, ops in counter.get_flop_counts().items()}


@pytest.mark.parametrize("swiglu", [False, True])
def test_megalodon_linear_and_attention_flops_match_torch(swiglu):
    """The linears (mm/addmm) exactly. The attention's bmms (those of the MEGA layer outside its CEMA, whose
    CPU path has matmuls of its own) execute whole chunk squares: the causal count with every query seeing the
    whole chunk."""
    config = tiny_config(chunk_size=16, swiglu=swiglu)
    model, length = Megalodon(config), 48
    counted = forward_flops(model, length)
    assert counted["Global"].get("mm", 0) + counted["Global"]["addmm"] == \
        2 * length * model_flops.linear_macs_per_token(model)
    attention = sum(counted[f"Megalodon.layers.{i}.mega"]["bmm"] - counted[f"Megalodon.layers.{i}.mega.cema"]["bmm"]
                    for i in range(config.num_layers))
    assert attention == 2 * length * config.num_layers * config.chunk_size * (config.z_dim + config.value_dim)
    causal = model_flops.attention_macs_per_token(config, length)
    assert causal == pytest.approx((config.chunk_size + 1) / 2 * (config.z_dim + config.value_dim))


def test_llama_linear_and_attention_flops_match_torch():
    """The linears exactly; attention as torch counts it is the full L x L products, and the causal work credited
    is (L + 1) / 2L of that."""
    model, length = Llama(matched_llama_config(tiny_config())), 40
    counted = forward_flops(model, length)["Global"]
    assert counted["mm"] == 2 * length * model_flops.linear_macs_per_token(model)
    full = 2 * length * model.config.num_layers * length * 2 * model.config.model_dim
    assert counted["bmm"] == full
    causal = 2 * length * model.config.num_layers * model_flops.attention_macs_per_token(model.config, length)
    assert causal == pytest.approx(full * (length + 1) / (2 * length))


@pytest.mark.parametrize("length, window", [(10, 10), (10, 4), (7, 16), (33, 8)])
def test_mean_visible_keys_counts_each_query_once(length, window):
    keys = [position % window + 1 for position in range(length)]
    assert model_flops.mean_visible_keys(length, window) == pytest.approx(sum(keys) / length)


def test_meta_models_count_like_real_ones():
    """The benchmark builds the big presets on the meta device: the count must not depend on that."""
    real = Megalodon(tiny_config())
    with torch.device("meta"):
        meta = Megalodon(tiny_config())
    assert model_flops.linear_macs_per_token(meta) == model_flops.linear_macs_per_token(real)
    assert model_flops.training_flops_per_token(meta, 64) == model_flops.training_flops_per_token(real, 64)
