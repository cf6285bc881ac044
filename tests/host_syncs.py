"""A detector of host syncs for CPU tests: what would make the host wait for a GPU, refused as it happens.

On a GPU, reading a tensor's value (`.item()`, `bool(t)`, `int(t)`, a boolean mask's indices) makes the host wait
for everything queued before it, and a CUDA graph cannot capture it at all. `torch.cuda.set_sync_debug_mode`
catches that on a GPU only; `no_host_syncs()` catches it on the CPU, and `gpu_code_path(monkeypatch)` makes the
CPU run the code a GPU runs (Triton kernels under the interpreter, value checks as device assertions)."""

import sys
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import force_triton
from megalodon import validation

aten = torch.ops.aten

# Ops whose result the host must wait for on a GPU: a value read back, or an output whose size depends on values.
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
           aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.repeat_interleave, aten.allclose}


def syncs(func, args) -> bool:
    if func.overloadpacket in SYNCING:
        return True
    if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):  # a boolean mask becomes nonzero()
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


# Tensor methods that copy values to the host without an aten op (on a CPU tensor they read memory directly).
HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


class _SyncingOps(TorchDispatchMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if syncs(func, args):
            self.found(f"{func} would make the host wait for the GPU")
        return func(*args, **(kwargs or {}))


class _HostCopies(TorchFunctionMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_COPIES:
            self.found(f"Tensor.{func.__name__} would make the host wait for the GPU")
        return func(*args, **(kwargs or {}))


def _refuse(what: str):
    raise AssertionError(what)


@contextmanager
def no_host_syncs():
    """Raises AssertionError at the first op or method that would make the host wait for a GPU."""
    with _HostCopies(_refuse), _SyncingOps(_refuse):
        yield


@contextmanager
def counted_host_syncs():
    """Yields a list that collects what, inside the block, would make the host wait for a GPU (one entry each)."""
    found: list[str] = []
    with _HostCopies(found.append), _SyncingOps(found.append):
        yield found


def device_value_checks(monkeypatch) -> None:
    """Every value check in its device form: validation.host_reads_free answers False, in every module that
    imported it."""
    rule = validation.host_reads_free
    for module in [m for name, m in sys.modules.items() if name.split(".")[0] == "megalodon"]:
        if getattr(module, "host_reads_free", None) is rule:
            monkeypatch.setattr(module, "host_reads_free", lambda tensor: False)


def gpu_code_path(monkeypatch) -> None:
    """The CPU through the GPU's code: every Triton kernel on (interpreter), every value check in its device form."""
    force_triton(monkeypatch)
    device_value_checks(monkeypatch)
