"""Compiling the Triton kernels for an H100 (sm_90) with no GPU: triton ships ptxas, so what the interpreter
accepts but the compiler rejects (loop-carried types, scalar masks) is caught on a CPU machine. compile_all also
compiles each kernel once for a T4 (sm_75), as GPUs without bf16 tensor cores, which `--dtype fp16` trains on,
need them to (every kernel and tiling: about 80 CPU-seconds more on a cold cache, for the same answer), and once
for an AMD MI300X (gfx942, ROCm), with the AMD backend and linker that triton's wheel also ships.

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


OLDER_GPU = 75  # a T4 (sm_75)
AMD_GPU = "gfx942"  # an MI300X; its wavefronts are 64 threads wide


def compile_for_h100(fn, types, constexprs, num_warps=4, as_launched=False, arch=90):
    """One kernel variant to an sm_90 binary (or sm_`arch`). types: the non-constexpr arguments' types, in order.
    as_launched: with what the launcher assumes of real arguments, pointers 16-byte aligned and integers
    divisible by 16 unless the kernel's do_not_specialize lists them (pass an argument of 1, such as a unit
    stride, among the constexprs: the launcher makes it one). That can change the layouts Triton picks."""
    import triton
    from triton.backends.compiler import GPUTarget

    types = iter(types)
    if as_launched:
        kept = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
        signature = {name: "constexpr" if name in constexprs else next(types) for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if signature[name] != "constexpr" and name not in kept and signature[name][:2] in ("*f", "*b", "*u",
                                                                                                  "*i", "i3", "i6")}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    elif "constexprs" in inspect.signature(triton.compiler.ASTSource.__init__).parameters:
        signature = {name: "constexpr" if name in constexprs else next(types) for name in fn.arg_names}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    else:  # triton 3.0 (torch 2.4's): arguments by position, constexprs apart
        signature = {i: next(types) for i, name in enumerate(fn.arg_names) if name not in constexprs}
        constants = {fn.arg_names.index(name): value for name, value in constexprs.items()}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constants=constants)
    from megalodon.ops.triton import LAUNCH

    target = GPUTarget("hip", arch, 64) if isinstance(arch, str) else GPUTarget("cuda", arch, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps, **LAUNCH})


def amd_backend() -> bool:
    """Whether this triton compiles for AMD GPUs here: its AMD backend, and the linker that comes with it."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy(source, target):
        tl.store(target, tl.load(source))

    try:
        compile_for_h100(copy, ["*fp32", "*fp32"], {}, arch=AMD_GPU)
    except (RuntimeError, FileNotFoundError, ImportError, KeyError) as error:
        print(f"no AMD backend in this triton: {error}")
        return False
    return True


def cuobjdump(compiled, option: str) -> str:
    """cuobjdump's report (`option`: -sass, -res-usage) on a compiled kernel; the tool ships with triton's NVIDIA
    backend."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(tool), option, cubin.name], capture_output=True, text=True, check=True).stdout


def sass(compiled) -> str:
    """The SASS of a compiled kernel."""
    return cuobjdump(compiled, "-sass")


def resources(compiled) -> dict[str, int]:
    """A compiled kernel's resources a thread as cuobjdump -res-usage reports them: REG, STACK (bytes), ..."""
    import re

    report = cuobjdump(compiled, "-res-usage")
    return {name: int(value) for name, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report)}


def _as_launched(cases, report):
    """Each case compiled as launched, with `report` (sass, resources) on it: (case, report) pairs. Where the first
    case cannot compile (no NVIDIA backend, ptxas or cuobjdump in this triton), the process exits with
    NO_NVIDIA_BACKEND; a later case that fails is a real failure."""
    for index, case in enumerate(cases):
        try:
            yield case, report(compile_for_h100(*case[:4], as_launched=True))
        except (RuntimeError, FileNotFoundError, ImportError, subprocess.CalledProcessError) as error:
            if index:
                raise
            print(error)
            sys.exit(NO_NVIDIA_BACKEND)


def assert_no_spill(cases) -> None:
    """Each case, compiled as launched, keeps its values in registers: no stack (spilled registers) at all."""
    for case, used in _as_launched(cases, resources):
        assert used["STACK"] == 0, (case[0].__name__, case[2], used)


def assert_in_thread(cases, ops=("BAR.", "SHFL", "STS", "LDS")) -> None:
    """Each case, compiled as launched, keeps its work inside each thread: no barrier, no shuffle and no shared
    memory anywhere in its SASS (none of `ops`)."""
    for case, text in _as_launched(cases, sass):
        found = {op: text.count(op) for op in ops}
        assert not any(found.values()), (case[0].__name__, case[2], found)


def assert_warp_local(cases) -> None:
    """Each case, compiled as launched, keeps its work inside each warp: shuffles, but no barrier and no shared
    memory."""
    assert_in_thread(cases, ops=("BAR.", "STS", "LDS"))


def compile_all(cases) -> None:
    try:
        compile_for_h100(*cases[0])
    except (RuntimeError, FileNotFoundError, ImportError) as error:  # no NVIDIA backend or ptxas in this triton
        print(error)
        sys.exit(NO_NVIDIA_BACKEND)
    for case in cases[1:]:
        assert compile_for_h100(*case).asm["cubin"], case[0].__name__
    firsts = {case[0]: case for case in reversed(cases)}.values()  # each kernel's first case: whether it runs
    for case in firsts:
        assert compile_for_h100(*case, arch=OLDER_GPU).asm["cubin"], (case[0].__name__, f"sm_{OLDER_GPU}")
    if amd_backend():
        for case in firsts:
            assert compile_for_h100(*case, arch=AMD_GPU).asm["hsaco"], (case[0].__name__, AMD_GPU)


def check_compiles_for_h100(code: str, check: str = "compile_all") -> None:
    """Run `code` (defining CASES) in a subprocess and compile every case (check: compile_all, or assert_in_thread
    for a kernel that must keep to its threads); skip where triton cannot target sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    script = code + f"\nimport sm90\nsm90.{check}(CASES)\n"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if result.returncode == NO_NVIDIA_BACKEND:
        pytest.skip(f"triton cannot compile for sm_90 here: {result.stdout.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
