"""Compiling the Triton kernels for an H100 (sm_90) with no GPU: triton ships ptxas, so what the interpreter
accepts but the compiler rejects (loop-carried types, scalar masks) is caught on a CPU machine.

Under the interpreter the kernels are not compilable objects, so the compiling runs in a subprocess without
TRITON_INTERPRET: `check_compiles_for_h100(code)` runs `code`, which imports the kernel modules and defines
CASES, a list of (kernel, argument types, constexpr values[, warps]), each compiled here.
"""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

NO_NVIDIA_BACKEND = 77  # the subprocess's exit status when this triton cannot compile for sm_90 at all


def compile_for_h100(fn, types, constexprs, num_warps=4):
    """One kernel variant to an sm_90 binary. types: the non-constexpr arguments' types, in order."""
    import triton
    from triton.backends.compiler import GPUTarget

    types = iter(types)
    if "constexprs" in inspect.signature(triton.compiler.ASTSource.__init__).parameters:
        signature = {name: "constexpr" if name in constexprs else next(types) for name in fn.arg_names}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    else:  # triton 3.0 (torch 2.4's): arguments by position, constexprs apart
        signature = {i: next(types) for i, name in enumerate(fn.arg_names) if name not in constexprs}
        constants = {fn.arg_names.index(name): value for name, value in constexprs.items()}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constants=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def compile_all(cases) -> None:
    try:
        compile_for_h100(*cases[0])
    except (RuntimeError, FileNotFoundError, ImportError) as error:  # no NVIDIA backend or ptxas in this triton
        print(error)
        sys.exit(NO_NVIDIA_BACKEND)
    for case in cases[1:]:
        assert compile_for_h100(*case).asm["cubin"], case[0].__name__


def check_compiles_for_h100(code: str) -> None:
    """Run `code` (defining CASES) in a subprocess and compile every case; skip where triton cannot target sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    script = code + "\nimport sm90\nsm90.compile_all(CASES)\n"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode == NO_NVIDIA_BACKEND:
        pytest.skip(f"triton cannot compile for sm_90 here: {result.stdout.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
