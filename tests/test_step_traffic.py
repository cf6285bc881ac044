"""benchmarks/step_traffic.py counts a training step's work per layer on the CPU: its FLOPs must be the models'
own, and its byte counts must cover both models in both modes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from megalodon import MegalodonConfig
from megalodon.baseline import Llama, matched_llama_config

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, *options):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_traffic.py"), "--preset", "tiny",
                          "--json", str(tmp_path / "tallies.json"), *options],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return {(row["model"], row["mode"]): row for row in json.loads((tmp_path / "tallies.json").read_text())}, out.stdout


def test_the_llamas_flops_per_layer_are_its_linears_and_causal_attention(tmp_path):
    """A layer's matmuls run three times each (forward, and two in backward): 6 x MACs x tokens; the flash kernel
    does the causal half of q.k and p.v forward, and 2.5 times that backward (it recomputes the scores)."""
    pytest.importorskip("triton")
    length = 64
    rows, stdout = run(tmp_path, "--length", str(length), "--modes", "eager")
    config = matched_llama_config(MegalodonConfig.from_preset("tiny", num_layers=1))
    layer = Llama(config).layers[0]
    macs = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    llama = rows["llama", "eager"]
    assert llama["gemm_flops"] == 6 * macs * length
    assert llama["flash_flops"] == pytest.approx(3.5 * 2 * 2 * length * length * config.model_dim / 2)
    megalodon = rows["megalodon", "eager"]
    assert megalodon["flash_flops"] == 0 and megalodon["gemm_flops"] > 0
    assert any(name.startswith("triton:") for name in megalodon["bytes"])  # the GPU's kernels were counted
    assert "estimated Megalodon / Llama" in stdout


@pytest.mark.slow
def test_compiled_blocks_count_inductors_kernels_and_the_triton_ones(tmp_path):
    """With compiled blocks the bytes come from the kernels Inductor generates (its scheduler's own sizes) and
    the Triton kernels inside the custom ops it keeps whole; the Llama has no Triton kernel there."""
    pytest.importorskip("triton")
    rows, stdout = run(tmp_path, "--length", "32")
    for model in ("megalodon", "llama"):
        assert rows[model, "compiled"]["bytes"]["inductor kernels"] > 0
        assert rows[model, "compiled"]["gemm_flops"] == rows[model, "eager"]["gemm_flops"]
    assert sum(v for k, v in rows["megalodon", "compiled"]["bytes"].items() if k.startswith("triton:")) > 0
    # the per-kind table names its rows as bench_gpu.py's profile does, so that a GPU run can be read against it
    assert "| CEMA (Triton) |" in stdout and "| compiled: fused by Inductor |" in stdout
