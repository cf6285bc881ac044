"""The checks bench_gpu.py runs before it times anything: what the device and software are, and whether the CUDA
model computes what the CPU reference computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GiB = 1024**3
# Bounds of the parity table: fp32 CUDA against fp32 CPU; bf16 and fp16 autocast (training's --dtype), and bf16
# weights (generate's and eval's --dtype auto on such a GPU) against fp32; a stream split in two. On the CPU, at the
# small preset's shape: 5.5e-3, 7.1e-4 and 7.1e-3 for the three casts.
PARITY_BOUNDS = {"logits_max_rel": 1e-4, "grad_worst_rel": 1e-3, "bf16_logits_max_rel": 5e-2,
                 "fp16_logits_max_rel": 1e-2, "bf16_weights_logits_max_rel": 5e-2, "split_max_rel": 1e-4}


def log(*args) -> None:
    print(*args, flush=True)


def environment(device: str) -> dict:
    from megalodon.ops.triton import disabled_ops, triton_installed

    info = {"device": "cpu", "torch": torch.__version__, "cuda": torch.version.cuda, "triton": None,
            "triton_disabled": sorted(disabled_ops())}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / GiB, 1))
    if triton_installed():
        import triton

        info["triton"] = triton.__version__
    log("## Environment\n")
    for key, value in info.items():
        log(f"- {key}: {value}")
    log()
    return info


def parity(preset: str, device: str) -> dict:
    """The model on `device` (Triton kernels where they run) against the CPU reference path, fp32: logits and
    gradients; then bf16 and fp16 autocast and bf16 weights against fp32, and a stream split in two against one
    call, on `device`."""
    log("## Parity: CUDA against CPU (fp32), bf16 and fp16 against fp32, split invariance\n")
    from megalodon import Megalodon, MegalodonConfig

    results = {}
    # The preset's shape with 2 layers: every kernel at its real width, a CPU pass that takes seconds.
    config = MegalodonConfig.from_preset(preset, num_layers=2)
    torch.manual_seed(0)
    cpu = Megalodon(config).float()
    with torch.no_grad():  # move the zero-initialized affines off zero so that they matter
        for name, param in cpu.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "mega.gamma", "mega.beta")):
                param.normal_(0.0, 0.1)
    model = Megalodon(config).to(device)
    model.load_state_dict(cpu.state_dict())
    length = 2 * config.chunk_size + 777  # two whole chunks and a partial one
    ids = torch.randint(0, config.vocab_size, (2, length))

    def run(model, ids):
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach().float().cpu(), grads

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    ref_logits, ref_grads = run(cpu, ids)
    out_logits, out_grads = run(model, ids.to(device))
    results["logits_max_rel"] = relative(out_logits, ref_logits)
    worst = max(ref_grads, key=lambda n: float((out_grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp(
        min=1e-30)))
    results["grad_worst_param"] = worst
    results["grad_worst_rel"] = float((out_grads[worst] - ref_grads[worst]).norm() / ref_grads[worst].norm())

    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            results[f"{name}_logits_max_rel"] = relative(model(ids.to(device)).float().cpu(), ref_logits)
    with torch.no_grad():
        bf16_weights = Megalodon(config).to(device)
        bf16_weights.load_state_dict(cpu.state_dict())
        results["bf16_weights_logits_max_rel"] = relative(
            bf16_weights.to(torch.bfloat16)(ids.to(device)).float().cpu(), ref_logits)
        del bf16_weights

    with torch.no_grad():
        cut = config.chunk_size + 313
        first, state = model(ids[:, :cut].to(device), return_state=True)
        second = model(ids[:, cut:].to(device), state=state)
        split = torch.cat([first, second], dim=1).float().cpu()
    results["split_max_rel"] = relative(split, out_logits)

    log("| check | value | bound | |\n|---|---|---|---|")
    for key, bound in PARITY_BOUNDS.items():
        ok = results[key] <= bound
        results[key + "_ok"] = ok
        log(f"| {key} | {results[key]:.2e} | {bound:.0e} | {'ok' if ok else 'FAIL'} |")
    log(f"\nworst gradient: {worst}\n")
    return results
