"""The host's share of an eager training step on the GPU code path, measured on a CPU: Megalodon against the
matched Llama, per layer.

    python benchmarks/host_overhead.py                       # mega200M's layers (widths / 16), bf16 autocast
    python benchmarks/host_overhead.py --seconds 20 --rounds 5

On an H100 an eager mega200M step at 4K tokens is bound by the host, not the GPU (docs/gpu.md, "H100
figures"): the Python, the dispatcher and the launches of about a hundred kernels a layer. That cost does not
depend on the tensors' sizes, so it can be measured without a GPU: the model runs on tiny CPU tensors along the
path a GPU takes (every Triton kernel on, launched through triton's own launcher: its argument binding, its
cache and its launch metadata, with a stand-in driver and the device launch itself left out; torch's norms and
value checks in their CUDA form, as op_counts.py runs them). The kernels are compiled for sm_90 on first use
(triton ships ptxas), which takes a warm-up of about 15 s. What this leaves out: the CUDA driver's own launch
cost (a few microseconds a kernel, both models alike) and the tensors' small CPU arithmetic (both models alike).

Per layer: a one-layer and an n-layer model, differenced, as op_counts.py does; the best of --rounds runs of
--seconds each, since other processes only ever add time. Pin it to one core (taskset -c 1) for steadier figures.
"""

from __future__ import annotations

import argparse
import time

import op_counts  # beside this file
import torch


def fake_cuda_driver() -> None:
    """Point triton at an sm_90 target with no device: kernels compile, launches bind their arguments and look up
    their compiled kernel as on a GPU, and the device launch does nothing."""
    import triton.compiler.compiler as compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    for name in ("_init_handles", "run"):
        if not hasattr(compiler.CompiledKernel, name):
            raise SystemExit(f"this triton's CompiledKernel has no {name}: host_overhead.py needs updating")
    driver.set_active(Driver())
    compiler.CompiledKernel._init_handles = lambda self: None
    compiler.CompiledKernel.run = property(lambda self: lambda *args: None)


def step_ms(arch: str, preset: str, layers: int, shrink: int, chunk: int, length: int, bf16: bool,
            seconds: float) -> float:
    model = op_counts.build(arch, preset, layers, chunk, shrink).train()
    ids = torch.randint(0, 256, (1, length))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(ids).float().square().mean().backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(3):
        step()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mega200M")
    parser.add_argument("--shrink", type=int, default=16, help="divide the preset's widths by this (default 16)")
    parser.add_argument("--chunk", type=int, default=32, help="Megalodon's chunk (default 32)")
    parser.add_argument("--length", type=int, default=64, help="training tokens (default 64)")
    parser.add_argument("--layers", type=int, default=4, help="the deeper model's layers (default 4)")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--seconds", type=float, default=6.0, help="each timed run (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per model and depth; the best counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fake_cuda_driver()
    if not op_counts.run_the_gpu_code(interpreted=False):
        raise SystemExit("host_overhead.py needs triton")
    print(f"{args.preset} layers (widths / {args.shrink}), {args.length} tokens, {args.dtype}, eager training "
          f"step on the GPU code path, host time only (best of {args.rounds} x {args.seconds:g} s)\n")
    print("| model | ms per layer | ms outside the layers |")
    print("|---|---|---|")
    rows = {}
    for arch in ("megalodon", "llama"):
        one, deep = (min(step_ms(arch, args.preset, n, args.shrink, args.chunk, args.length, args.dtype == "bf16",
                                 args.seconds) for _ in range(args.rounds)) for n in (1, args.layers))
        rows[arch] = (deep - one) / (args.layers - 1)
        print(f"| {arch} | {rows[arch]:.2f} | {one - rows[arch]:.2f} |")
    print(f"\nMegalodon / Llama, per layer: {rows['megalodon'] / rows['llama']:.2f}")


if __name__ == "__main__":
    main()
