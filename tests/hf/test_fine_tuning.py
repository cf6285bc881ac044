"""Fine-tuning as Hugging Face users do: transformers' Trainer (gradient accumulation steps like one large batch; a
run saves a model that loads back and checkpoints that resume exactly) and PEFT's LoRA adapters."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from hf.conftest import build_core  # noqa: E402
from megalodon.hf import wrap  # noqa: E402

LENGTH = 24


def rows(count: int, masked=None) -> list[dict]:
    """Rows whose labels mask a different number of leading tokens each (prompts: 5 i, or masked[i]), so that the
    mean over a step's tokens differs from the mean of its micro-batches' means."""
    generator = torch.Generator().manual_seed(3)
    found = []
    for i in range(count):
        ids = torch.randint(0, 256, (LENGTH,), generator=generator)
        labels = ids.clone()
        labels[:5 * i if masked is None else masked[i]] = -100
        found.append({"input_ids": ids, "labels": labels})
    return found


def collate(batch: list[dict]) -> dict:
    return {key: torch.stack([row[key] for row in batch]) for key in batch[0]}


def fine_tune(out_dir, data, share_emb=False, **options):
    """A Trainer over a fresh seeded tiny model (plain SGD at a constant rate, no clipping: the update is the
    gradient itself), run to its end."""
    model = wrap(build_core(seed=0, share_emb=share_emb).train())
    arguments = dict(output_dir=str(out_dir), use_cpu=True, report_to=[], optim="sgd", learning_rate=0.5,
                     lr_scheduler_type="constant", max_grad_norm=0.0, seed=0, save_strategy="no",
                     disable_tqdm=True, logging_steps=1)
    arguments.update(options)
    resume = arguments.pop("resume_from_checkpoint", None)
    trainer = Trainer(model=model, args=TrainingArguments(**arguments), train_dataset=data, data_collator=collate)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_gradient_accumulation_steps_like_one_large_batch(tmp_path):
    data = rows(4)
    start = {name: p.detach().clone() for name, p in wrap(build_core(seed=0)).named_parameters()}
    whole = fine_tune(tmp_path / "whole", data, per_device_train_batch_size=4, max_steps=1)
    accumulated = fine_tune(tmp_path / "accumulated", data, per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, max_steps=1)
    moved = 0
    for (name, mine), theirs in zip(accumulated.model.named_parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(mine, start[name])
    assert moved > 10  # the step changed the weights
    losses = [trainer.state.log_history[0]["loss"] for trainer in (accumulated, whole)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# Labelled tokens 24, 21, 20 and 9: however the ranks share the four rows, the mean of the ranks' means is not the
# mean over the step's tokens.
RANK_ROWS_MASKED = [0, 3, 4, 15]


@pytest.mark.slow
def test_ranks_under_torchrun_step_like_one_process_on_their_global_batch(tmp_path):
    """The Trainer under torchrun (DDP over gloo): 2 ranks of 2 rows take the step that one process takes on the 4
    rows. The Trainer counts the step's labelled tokens over every rank (average_tokens_across_devices) and scales
    for DDP's averaging; the model's loss must divide by that count (num_items_in_batch) for the two to meet."""
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(Path(__file__).with_name("fine_tune_on_ranks.py")), str(tmp_path / "ranks")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = load_file(str(tmp_path / "ranks" / "weights.safetensors"))
    start = {name: p.detach().clone() for name, p in wrap(build_core(seed=0)).named_parameters()}
    whole = fine_tune(tmp_path / "whole", rows(4, RANK_ROWS_MASKED), per_device_train_batch_size=4, max_steps=1)
    moved = 0
    for name, mine in whole.model.named_parameters():
        torch.testing.assert_close(ranks[name], mine.detach(), rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(mine, start[name])
    assert moved > 10


@pytest.mark.parametrize("share_emb", [False, True])
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # 5.x renames it
def test_a_run_saves_a_model_that_loads_and_checkpoints_that_resume(tmp_path, share_emb, caplog):
    """Resumed from its checkpoint, a run ends with the uninterrupted run's weights, without a warning of missing
    keys (a tied head is saved once, as the embedding); the saved model loads through AutoModelForCausalLM."""
    data = rows(8)
    options = dict(per_device_train_batch_size=2, gradient_checkpointing=True, share_emb=share_emb)
    straight = fine_tune(tmp_path / "straight", data, max_steps=3, **options)
    fine_tune(tmp_path / "stopped", data, max_steps=3, save_strategy="steps", save_steps=2, **options)
    resumed = fine_tune(tmp_path / "stopped", data, max_steps=3, resume_from_checkpoint=str(
        tmp_path / "stopped" / "checkpoint-2"), **options)
    assert "missing keys" not in caplog.text
    for (name, mine), theirs in zip(resumed.model.named_parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)

    straight.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    ids = data[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, straight.model.eval()(ids).logits, rtol=0, atol=0)
    if share_emb:
        assert loaded.model.output.output.weight is loaded.model.embed.weight


def test_peft_lora_on_every_linear_trains_and_merges():
    """PEFT's LoRA layers on the MEGA and FFN linears (which the fused paths would skip if they read the weights):
    every adapter tensor gets its gradient, and after a few steps the adapted model's logits and greedy generation
    are the merged model's."""
    peft = pytest.importorskip("peft")

    torch.manual_seed(0)
    targets = ["wz", "wv", "wr", "wh1", "wh2", "fc1", "fc2", "fc3"]
    model = peft.get_peft_model(wrap(build_core(seed=0, swiglu=True)).train(),
                                peft.LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    adapters = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert len(adapters) == 2 * len(targets) * 2  # A and B, in each of the two layers
    optimizer = torch.optim.SGD(adapters.values(), lr=1.0)
    ids = rows(1)[0]["input_ids"].repeat(2, 1)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in adapters.values())
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().max() > 0 for name, p in adapters.items() if "lora_B" in name)  # B starts at zero
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        generated = model.generate(input_ids=ids[:, :7], max_new_tokens=8, do_sample=False)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        assert torch.equal(merged.generate(input_ids=ids[:, :7], max_new_tokens=8, do_sample=False), generated)
