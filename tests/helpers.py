"""Shared builders for the tests: tiny models small enough for float64."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from megalodon import Megalodon, MegalodonConfig


def tiny_config(**overrides) -> MegalodonConfig:
    """A model small enough for float64 tests: 2 layers, chunk 8, two heads."""
    values = dict(chunk_size=8, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=48, norm_num_groups=4,
                  cema_ndim=4, vocab_size=64)
    values.update(overrides)
    return MegalodonConfig.from_preset("tiny", **values)


def tiny_model(dtype=torch.float64, seed=0, **overrides) -> Megalodon:
    torch.manual_seed(seed)
    model = Megalodon(tiny_config(**overrides)).to(dtype).eval()
    with torch.no_grad():  # move the zero-initialized affines off zero so that they are exercised
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "mega.gamma", "mega.beta", "rmsnorm.weight")):
                param.normal_(0.0, 0.1)
    return model


# Skips a test cleanly on machines without a GPU (CI has none); marked cuda (gpu_session.sh runs those). As marks,
# for pytest.param(..., marks=CUDA_MARKS).
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


def requires_cuda(test):
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


# The GPU's kernels on CPU tensors: Triton's interpreter, which tests/conftest.py turns on where there is no GPU
# (on a GPU machine the cuda-marked tests run the kernels there instead).
INTERPRETER = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
WHY_NO_INTERPRETER = ("runs the GPU's Triton kernels on CPU tensors, which needs triton and its interpreter "
                      "(TRITON_INTERPRET=1, set by tests/conftest.py where there is no GPU)")


def interpreted_script(path, *args: str) -> list[str]:
    """The command that runs a script as __main__ under Triton's interpreter as sped up for the tests
    (tests/triton_interpreter.py); the caller sets TRITON_INTERPRET=1 in its environment."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import triton_interpreter; "
            f"triton_interpreter.run_script(*{[str(path), *args]!r})")
    return [sys.executable, "-c", code]


# Skips a test that runs the kernels on CPU tensors where that cannot be done. A mark, so that it decorates a test
# and also goes in pytest.param(..., marks=requires_triton).
requires_triton = pytest.mark.skipif(not INTERPRETER, reason=WHY_NO_INTERPRETER)


def force_fused_rms_norm(monkeypatch) -> None:
    """The RMSNorms on torch's path (F.rms_norm) for CPU tensors too, as on a GPU with torch's fused kernel."""
    from megalodon.baseline import llama
    from megalodon.ops import fused

    for module in (fused, llama):
        monkeypatch.setattr(module, "FUSED_RMS_NORM_DEVICES", fused.FUSED_RMS_NORM_DEVICES | {"cpu"})


def kernel_only(monkeypatch, dispatcher, op: str, kernels, *entries: str) -> list[str]:
    """One op's Triton path on (`dispatcher.use_triton` answers True for `op` alone), every other op as it is;
    returns a list that records each call of the kernel module's named entry points."""
    monkeypatch.setattr(dispatcher, "use_triton", lambda name, *tensors: name == op)
    calls = []
    for entry in entries:
        run = getattr(kernels, entry)
        monkeypatch.setattr(kernels, entry, lambda *a, _entry=entry, _run=run: calls.append(_entry) or _run(*a))
    return calls


def both_paths(monkeypatch, fn, dispatcher, op: str, kernels, entry: str):
    """fn() on the PyTorch path, then with kernel_only(op) (whose entry point must run): (got, want)."""
    want = fn()
    calls = kernel_only(monkeypatch, dispatcher, op, kernels, entry)
    got = fn()
    assert calls, f"the Triton path of {op} did not run"
    return got, want


def force_triton(monkeypatch, compiled: bool = False) -> list[str]:
    """Every op on its GPU path, for CPU tensors too: the Triton kernels (the interpreter runs them) and the
    RMSNorm on torch's fused kernel. Returns a list that records each kernel entry point of training and decode
    as it runs. compiled: the model will run under torch.compile,
    where the softmax kernels (called inside an autograd.Function, which dynamo allows no side effects) cannot be
    recorded."""
    if not INTERPRETER:
        pytest.skip(WHY_NO_INTERPRETER)
    force_fused_rms_norm(monkeypatch)
    from megalodon.ops import attention as attention_ops
    from megalodon.ops import cema as cema_ops
    from megalodon.ops import fused as fused_ops
    from megalodon.ops import static_kv as static_kv_ops
    from megalodon.ops import timestep_norm as norm_ops
    from megalodon.ops.triton import causal_softmax as softmax_kernels
    from megalodon.ops.triton import cema as cema_kernels
    from megalodon.ops.triton import fused as fused_kernels
    from megalodon.ops.triton import queries_keys as qk_kernels
    from megalodon.ops.triton import static_kv as static_kv_kernels
    from megalodon.ops.triton import timestep_norm as norm_kernels

    for module in (attention_ops, cema_ops, norm_ops, static_kv_ops, fused_ops):
        monkeypatch.setattr(module, "use_triton", lambda op, *tensors: True)
    calls = []
    for module, name in ((cema_kernels, "cema_scan"), (norm_kernels, "timestep_norm_triton"),
                         (qk_kernels, "queries_keys_triton"), (static_kv_kernels, "write_and_attend_triton"),
                         (fused_kernels, "norm_rows"), (fused_kernels, "silu_gate"),
                         (fused_kernels, "silu_gate_backward"), (fused_kernels, "add_linear"),
                         *(() if compiled else ((softmax_kernels, "causal_softmax_fwd"),
                                                (softmax_kernels, "causal_softmax_bwd")))):
        def recorded(*args, _name=name, _run=getattr(module, name), **kwargs):
            calls.append(_name)
            return _run(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)
    return calls


def save_byte_model(directory):
    """A tiny fp32 model with the byte tokenizer saved beside it: a model directory the CLI verbs accept."""
    from megalodon.data import ByteTokenizer

    tiny_model(torch.float32, vocab_size=259).save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


def saved_bytes(fn, *args) -> int:
    """The bytes of the tensors autograd keeps for backward while fn(*args) runs (each storage once), compiled or
    not: a compiled graph's saved tensors go through the same hooks."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(saved.values())


def edit_safetensors(path, edit, metadata: dict | None = None, out=None) -> None:
    """Write path's tensors with edit(tensors) applied to `out` (default: path itself), as a hand edit of a saved
    file would. The tensors are copied out of the file and the new one replaces it whole: older safetensors (0.4)
    map the tensors from the file, and rewriting a mapped file under them ends the process with SIGBUS."""
    from safetensors.torch import load_file, save_file

    tensors = {name: t.clone() for name, t in load_file(str(path)).items()}
    edit(tensors)
    out = Path(path if out is None else out)
    save_file(tensors, str(out.with_suffix(".partial")), metadata=metadata)
    os.replace(out.with_suffix(".partial"), out)
