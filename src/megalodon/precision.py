"""Which floating-point type to compute in, on which device: the one rule behind the trainer's `--dtype auto` and
the inference commands' `--dtype auto`, and the names both take."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat fp32 here: on GPUs with bf16 tensor cores (NVIDIA from Ampere, compute
    capability 8.0, and ROCm), or on CPUs with AMX or AVX512-BF16. Elsewhere bf16 runs emulated, several times
    slower than fp32 (torch.cuda.is_bf16_supported() says yes to a V100 or a T4 all the same: emulation counts)."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
    return _cpu_has_bf16_units()


@functools.cache
def _cpu_has_bf16_units() -> bool:  # asked on every step: read /proc/cpuinfo once
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16 or fp16; torch's own name for any other (float64)."""
    return next((name for name, known in DTYPE_NAMES.items() if known == dtype), str(dtype).removeprefix("torch."))


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for `megalodon generate` and `eval` (--dtype): "auto" is bf16 on a GPU with bf16 tensor
    cores, where it halves the weights' memory and the bytes each decode step reads, and fp32 elsewhere (a CPU's
    decode step is bound by its many small ops, not by bytes; fp32 also gives the figures training reported).
    The CEMA's and the norms' statistics and the recurrent state's sums stay fp32 or better in any of them."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and fast_bf16(device) else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name]
