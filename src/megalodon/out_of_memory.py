"""Running out of memory, told as what ran out and which settings need less.

torch's message says how much it tried to allocate and what the device holds, not which of our settings asked
for it. The trainer wraps its big steps in `explain_out_of_memory`, which keeps torch's figures and names the
options that lower the need; the command line does the same for every command (cli.describe_error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# where torch's CUDA message turns from figures to its own advice (allocator settings, documentation links)
_ADVICE_STARTS = (" Including non-PyTorch memory", " Of the allocated memory", " If reserved but unallocated")


class OutOfMemory(RuntimeError):
    """Memory ran out doing something; the message says what, with torch's figures, and which settings need less."""


def is_out_of_memory(err: BaseException) -> bool:
    """A device's out-of-memory error, or the CPU allocator's (a RuntimeError of its own wording)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def torch_figures(err: BaseException) -> str:
    """The part of torch's message that says how much was asked and what was free, on one line."""
    text = " ".join(str(err).split())
    if "DefaultCPUAllocator:" in text:  # "[enforce fail at alloc_cpu.cpp:N] ... DefaultCPUAllocator: can't ..."
        text = "CPU " + text.split("DefaultCPUAllocator:", 1)[1].strip()
    for start in _ADVICE_STARTS:
        text = text.split(start, 1)[0]
    return text.strip()


@contextmanager
def explain_out_of_memory(doing: str, fixes: str | Callable[[], str]) -> Iterator[None]:
    """Turn an out-of-memory error inside into OutOfMemory("out of memory <doing> (<torch's figures>): <fixes>"),
    chained to the original; any other error passes unchanged. fixes may be a function, called only then."""
    try:
        yield
    except Exception as err:
        if isinstance(err, OutOfMemory) or not is_out_of_memory(err):
            raise
        raise OutOfMemory(f"out of memory {doing} ({torch_figures(err)}): "
                          f"{fixes() if callable(fixes) else fixes}") from err


# ---- what lowers the need, by where it ran out (the options are the command line's) ------------------------------
def training_step_fixes(activation_checkpointing: bool) -> str:
    options = [] if activation_checkpointing else [
        "--activation_checkpointing true (a run may turn it on when it resumes with --resume)"]
    options += ["a larger --grad_accum (smaller micro-batches, the same tokens per step; a new run)",
                "a shorter --seq_len (a new run)",
                "several GPUs with --nproc N (FSDP shards the weights, gradients and optimizer state)"]
    return "a step needs less with " + ", ".join(options[:-1]) + ", or " + options[-1]


def weights_fixes(parameters: int, optimizer: bool) -> str:
    per_parameter = 16 if optimizer else 4  # fp32 weights; with training, their gradients and AdamW's two moments
    what = "the weights, their gradients and AdamW's two moments" if optimizer else "the fp32 weights"
    return (f"{what} take {per_parameter} bytes a parameter, {parameters * per_parameter / 2**30:.1f} GiB for this "
            f"model's {parameters:,}: train a smaller model, or shard them over several GPUs with --nproc N (FSDP)")


EVALUATION_FIXES = "lower --eval_batch_size (a run may change it when it resumes with --resume)"

# for an error that reached the command line unexplained
COMMAND_FIXES = {
    "train": "lower --batch_size or --seq_len, or turn on --activation_checkpointing true",
    "compare": "lower --batch_size or --seq_len, or turn on --activation_checkpointing true",
    "generate": "give fewer prompts at once (each is a row of one batch), or use --device cpu",
    "eval": "use a smaller --block-size (tokens per call), and for the baseline a smaller --window or --max-context",
}
