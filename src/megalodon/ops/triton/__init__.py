"""Triton kernels for the ops of this package, and the one rule that says when they run.

Each kernel lives beside the op it speeds up (`ops/triton/<op>.py` for `ops/<op>.py`); the PyTorch path in
`ops/` stays the fallback and the reference. Kernel modules are imported lazily, on the first CUDA call, so that
importing megalodon never needs triton.

Tests run the kernels on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set by tests/conftest.py
when there is no GPU). The interpreter decides at decoration time, so the variable must be set before a kernel
module is first imported.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import warnings

import torch
from torch import Tensor

from megalodon.ops.formula import eager_function

DISABLE_ENV = "MEGALODON_DISABLE_TRITON"

# What every launch of this package's kernels passes besides its arguments. enable_fp_fusion: a * b + c compiles
# to one FMA, the default of every Triton before 3.10, which turns it off (3.9 warns at each first compile). The
# CEMA's recurrences are chains of complex multiply-adds: unfused, their main loops issue about twice the
# instructions and round differently from what the GPU tests measured.
LAUNCH = {"enable_fp_fusion": True}


# Looked up once at import: a cached function here would make torch.compile warn on every traced call.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Ops whose kernels a GPU run measured slower than torch's own ops (benchmarks/gpu_tuning.py): they take the
# PyTorch path everywhere, as if MEGALODON_DISABLE_TRITON named them. None so far.
OFF_BY_DEFAULT: frozenset[str] = frozenset()


def disabled_ops() -> set[str]:
    """Ops forced onto the PyTorch path: OFF_BY_DEFAULT, and MEGALODON_DISABLE_TRITON's "1" or "all" for every op,
    or a comma list of op names such as "cema,timestep_norm"."""
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value in ("", "0"):
        return set(OFF_BY_DEFAULT)
    return {"all"} if value in ("1", "all", "true") else {name.strip() for name in value.split(",")} | OFF_BY_DEFAULT


def use_triton(op: str, *tensors: Tensor) -> bool:
    """Whether op's Triton path should run for these inputs: all on CUDA, triton installed, op not disabled.

    MEGALODON_DISABLE_TRITON (see disabled_ops) forces the PyTorch path, to compare or to work around a kernel
    bug without editing code."""
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return False
    if not _TRITON_INSTALLED:
        _warn_without_triton()
        return False
    off = disabled_ops()
    return "all" not in off and op not in off


@functools.cache  # once a process
def _warn_without_triton() -> None:
    warnings.warn("triton is not installed: on this GPU the CEMA, the TimestepNorm and the other ops with Triton "
                  "kernels run on their PyTorch path, several times slower (pip install triton, which CUDA builds "
                  "of torch for Linux bring)", stacklevel=3)


class OpaqueOp:
    """One op of this package that a traced graph holds as one opaque node, callable like the function it wraps:
    each op on Triton kernels, and the computations whose saved tensors must be the ones their autograd formula
    names (the materialized attention and the gated linear: traced through, the partitioner keeps what they
    recompute).

    `op` is its torch.library custom op: one node of a traced graph, with its fake (shapes only) and its autograd
    formula registered, which torch.compile needs. Outside a trace the dispatcher's path for a custom op (its
    schema's defaults filled in, the outputs' aliasing checked, dynamo's disable guard, a Python autograd wrapper)
    costs tens of microseconds of host time per call and buys nothing, and an eager GPU step at 4K tokens is bound
    by the host; so a call runs the custom op only while torch.compile traces or where a tensor argument is not a
    plain tensor (fake and functional tensors, subclasses), and otherwise the implementation itself, through an
    autograd.Function made from the same formula when the op has one. Arguments positionally."""

    def __init__(self, name: str, fn, mutates_args=()):
        self.op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        self._fn = self._eager = fn
        parameters = list(inspect.signature(fn).parameters.values())
        self._defaults = tuple(p.default for p in parameters if p.default is not inspect.Parameter.empty)
        self._arity = len(parameters)
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__  # not __wrapped__: tracers would look through it

    def register_fake(self, fake):
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward, setup_context) -> None:
        """The op's gradient: backward(ctx, *grads) and setup_context(ctx, inputs, output), as torch.library's
        register_autograd takes them, for the custom op and for eager calls alike."""
        self.op.register_autograd(backward, setup_context=setup_context)
        self._eager = eager_function(self._fn, setup_context, backward)

    def __call__(self, *args):
        if not runs_eagerly(*args):
            return self.op(*args)
        if len(args) < self._arity:  # the defaults, as the custom op's setup_context sees them
            args = args + self._defaults[len(self._defaults) - (self._arity - len(args)):]
        return self._eager(*args)


_PLAIN = (Tensor, torch.nn.Parameter)


def runs_eagerly(*args) -> bool:
    """Whether a call with these arguments runs eagerly on real tensors: not inside torch.compile's trace, and no
    tensor argument fake, functional or a subclass (what a tracer hands an op, whichever torch version)."""
    return not torch.compiler.is_compiling() and all(type(a) in _PLAIN for a in args if isinstance(a, Tensor))


def opaque_op(name: str, mutates_args=()):
    """Decorator: the function as an OpaqueOp named `name` ("megalodon::..."), like torch.library.custom_op."""
    return lambda fn: OpaqueOp(name, fn, mutates_args)


# triton.cdiv and triton.next_power_of_2 are constexpr functions: called from Python they go through triton's
# wrapper, a few microseconds each, which an eager step pays a few hundred times. These are the plain arithmetic.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def on_input_device(launcher):
    """Run a kernel launcher with the GPU of its first argument (a tensor) as the current device. Triton launches
    on the current device whatever device the tensors are on, so a model on cuda:1 in a process whose current
    device is cuda:0 would otherwise hand cuda:1 pointers to kernels running on cuda:0."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        device = args[0].device
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return launch
