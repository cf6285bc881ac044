"""Every kernel of this package is compiled with the launch options it asks for (ops/triton/__init__.py's LAUNCH),
whatever Triton's defaults: Triton 3.10 turns FMA contraction off by default, which would roughly double the
instructions of the CEMA's recurrences."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A training step and a decode step of a tiny bf16 model along the GPU's code path, every kernel compiled for
# sm_90 and launched through triton's own launcher (host_overhead.py's stand-in driver: nothing runs), then the
# options each compiled variant of each kernel was built with.
SCRIPT = """
import importlib, json, pkgutil, sys
import torch, triton
sys.path.insert(0, sys.argv[1])
import op_counts
from host_overhead import fake_cuda_driver

fake_cuda_driver()
assert op_counts.run_the_gpu_code(interpreted=False)
model = op_counts.build("megalodon", "tiny", 2, 16, 1).train()
with torch.autocast("cpu", dtype=torch.bfloat16):
    model(torch.randint(0, 256, (1, 32))).float().square().mean().backward()
op_counts.decode_ops(model, "bf16")

import megalodon.ops.triton as package
fusion = {}
for info in pkgutil.iter_modules(package.__path__):
    module = importlib.import_module(f"{package.__name__}.{info.name}")
    for name, kernel in vars(module).items():
        if isinstance(kernel, triton.runtime.jit.JITFunction):
            for caches in kernel.device_caches.values():
                for variant in caches[0].values():
                    fusion.setdefault(f"{info.name}.{name}", []).append(variant.metadata.enable_fp_fusion)
print(json.dumps(fusion))
"""


def test_every_kernel_compiles_with_fma_contraction_whatever_the_default():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # Triton 3.10's default: a kernel that does not ask gets no FMAs
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "benchmarks")], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    if "needs updating" in out.stdout + out.stderr or "No module named 'triton.backends.nvidia" in out.stderr:
        pytest.skip("this triton has no launcher host_overhead.py's stand-in driver fits")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    fusion = json.loads(out.stdout.strip().splitlines()[-1])
    modules = {name.split(".")[0] for name in fusion}
    # the training step's kernels and the decode step's, in every module that launches any
    assert modules >= {"cema_kernels", "cema_tables", "timestep_norm_kernels", "timestep_norm_carry", "fused",
                       "queries_keys", "causal_softmax", "cema_step", "timestep_norm_step", "static_kv"}, sorted(fusion)
    unfused = sorted(name for name, flags in fusion.items() if not all(flags))
    assert not unfused, f"compiled without FMA contraction: {unfused}"
