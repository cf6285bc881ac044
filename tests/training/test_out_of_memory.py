"""Running out of memory: where it happened, torch's figures, which options need less, and nothing lost."""

import dataclasses

import pytest
import torch

import megalodon.training.trainer as trainer_module
from megalodon.cli import describe_error
from megalodon.out_of_memory import OutOfMemory, explain_out_of_memory, is_out_of_memory, torch_figures
from megalodon.training.checkpoint import list_checkpoints
from megalodon.training.trainer import train
from training_helpers import losses

# torch's CUDA message, as torch 2.x words it (one line)
CUDA_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                "1.21 GiB is free. Including non-PyTorch memory, this process has 77.97 GiB memory in use. Of the "
                "allocated memory 76.10 GiB is allocated by PyTorch, and 1.23 GiB is reserved by PyTorch but "
                "unallocated. If reserved but unallocated memory is large try setting "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
                "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


def test_out_of_memory_errors_are_told_apart_from_others():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError(CUDA_MESSAGE))
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2 ** 60, dtype=torch.uint8)  # 1 EiB, past any address space: the CPU allocator's own error
    assert is_out_of_memory(cpu.value)
    assert torch_figures(cpu.value).startswith("CPU can't allocate memory: you tried to allocate 1152921504606846976 "
                                               "bytes.")
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("memory"))
    assert torch_figures(torch.cuda.OutOfMemoryError(CUDA_MESSAGE)) == (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.21 GiB "
        "is free.")


def test_explain_keeps_other_errors_and_chains_the_original():
    with pytest.raises(ValueError, match="^other$"):
        with explain_out_of_memory("doing x", "do y"):
            raise ValueError("other")
    original = torch.cuda.OutOfMemoryError(CUDA_MESSAGE)
    with pytest.raises(OutOfMemory) as caught:
        with explain_out_of_memory("doing x", lambda: "do y"):
            raise original
    assert str(caught.value) == f"out of memory doing x ({torch_figures(original)}): do y"
    assert caught.value.__cause__ is original
    with pytest.raises(OutOfMemory, match="^out of memory doing x") as inner:  # the innermost explanation stays
        with explain_out_of_memory("doing z", "do w"), explain_out_of_memory("doing x", "do y"):
            raise original
    assert "doing z" not in str(inner.value)


def run_out_of_memory_at(monkeypatch, step: int) -> None:
    """The trainer's forward raises torch's CUDA out-of-memory error at this (1-based) training step."""
    real, calls = trainer_module.forward_loss, []

    def forward_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) > (step - 1) * 2:  # two micro-batches a step (grad_accum 2)
            raise torch.cuda.OutOfMemoryError(CUDA_MESSAGE)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "forward_loss", forward_loss)


def test_a_training_step_out_of_memory_names_the_fixes_and_the_run_resumes(make_config, tmp_path, monkeypatch):
    cfg = make_config(checkpoint_every=2)
    run_out_of_memory_at(monkeypatch, 4)
    with pytest.raises(OutOfMemory) as caught:
        train(cfg, tmp_path / "run", progress=False)
    message = str(caught.value)
    assert message.startswith("out of memory in training step 4 on cpu, 2 x 64 tokens a micro-batch (CUDA out of "
                              "memory. Tried to allocate 2.00 GiB.")
    assert "--activation_checkpointing true" in message and "--grad_accum" in message and "--nproc" in message
    latest = list_checkpoints(tmp_path / "run")[-1]
    assert message.endswith(f"Nothing of this step was saved; the last checkpoint is {latest}")
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)
    # the checkpoint named is where the run goes on from, with the fix it names, as a run that never ran out
    monkeypatch.undo()
    train(dataclasses.replace(cfg, activation_checkpointing=True), tmp_path / "run", resume=True, progress=False)
    train(cfg, tmp_path / "straight", progress=False)
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_the_fixes_leave_out_what_the_run_already_does(make_config, tmp_path, monkeypatch):
    run_out_of_memory_at(monkeypatch, 1)
    with pytest.raises(OutOfMemory) as caught:
        train(make_config(activation_checkpointing=True), tmp_path / "run", progress=False)
    assert "activation_checkpointing" not in str(caught.value)
    assert str(caught.value).endswith("no checkpoint was written yet")


def test_evaluation_and_the_optimizer_out_of_memory_say_so(make_config, tmp_path, monkeypatch):
    def evaluate(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(CUDA_MESSAGE)

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    with pytest.raises(OutOfMemory, match=r"^out of memory in evaluation on cpu, 4 x 64 tokens a call \(.*: lower "
                                          r"--eval_batch_size \(a run may change it when it resumes"):
        train(make_config(max_steps=2), tmp_path / "eval", progress=False)
    monkeypatch.undo()

    def step(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(CUDA_MESSAGE)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(OutOfMemory) as caught:
        train(make_config(max_steps=2), tmp_path / "optimizer", progress=False)
    assert str(caught.value).startswith("out of memory in the optimizer's step on cpu (CUDA out of memory.")
    assert "AdamW's two moments take 16 bytes a parameter" in str(caught.value)


def test_the_command_line_explains_an_out_of_memory_error_by_command():
    error = torch.cuda.OutOfMemoryError(CUDA_MESSAGE)
    told = describe_error(error, "generate")
    assert told.startswith("out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert told.endswith("give fewer prompts at once (each is a row of one batch), or use --device cpu")
    assert "--block-size" in describe_error(error, "eval")
    explained = OutOfMemory("out of memory in training step 3 (...): a step needs less with ...")
    assert describe_error(explained, "train") == str(explained)  # already explained where it happened
