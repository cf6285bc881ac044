"""The trainer on several ranks (issue 14) equals the trainer in one process at the same global batch: DDP and
FSDP2 on 2 ranks, a 2 x 2 (dp x cp) mesh, and a checkpoint written on 2 ranks resumed on 1 and on 4.

The runs are the tiny fp32 byte-level runs of tests/training, stateful (the carried state crosses windows), with
AdamW, gradient clipping and a final evaluation; the ranks are the session's gloo pools (conftest.py)."""

import os
import shutil
import signal
import threading
import time

import pytest
from safetensors.torch import load_file

import train_tasks
from megalodon.checkpoint import load_pretrained
from megalodon.parallel.runtime import step_seed
from megalodon.cli import main
from megalodon.training.checkpoint import list_checkpoints
from megalodon.training.config import TrainConfig
from megalodon.training.trainer import train
from training_helpers import losses, run_values, strict_records

LOSS_TOL = 1e-5
# AdamW divides each update by the gradient's own scale, so the rounding of small gradients (a sum in another
# order on other ranks) reaches the weights as a fraction of lr; measured up to 3.1e-6 here, under the 1e-5.
WEIGHT_TOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for i in range(40):  # 2 validation documents: each of 2 replicas evaluates one
        lines = [" ".join(words[(3 * i + j * k) % len(words)] for k in range(7)) for j in range(4)]
        (root / f"part{i}.txt").write_text("\n".join(lines))
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def options(corpus, workdir, **overrides) -> dict:
    # one data_dir for every run: the token store is built once
    return run_values(corpus, workdir, **{"max_steps": 3, "checkpoint_every": 0, "eval_batch_size": 2, **overrides})


def weights(run_dir) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def comparable(tensors: dict) -> dict:
    """The weights whose values the run determines. The key bias (row 1 of mega.beta) has an exactly zero true
    gradient, since the softmax ignores a shift shared by all keys: AdamW turns its rounding noise, which depends
    on the order of summation, into updates of +-lr (docs/distributed.md)."""
    return {k: v[0] if k.endswith("mega.beta") else v for k, v in tensors.items()}


def max_rel(a: dict, b: dict) -> float:
    a, b = comparable(a), comparable(b)
    return max(float((a[k].double() - b[k].double()).abs().max() / max(float(b[k].abs().max()), 1e-3)) for k in b)


def validation(run_dir) -> list[float]:
    return [r["val_loss"] for r in strict_records(run_dir / "metrics.jsonl") if "val_loss" in r]


def one_process(values: dict, run_dir, **kwargs):
    train(TrainConfig(**values), run_dir, progress=False, **kwargs)
    return losses(run_dir), weights(run_dir), validation(run_dir)


def compare(run_dir, reference) -> None:
    """Training losses, the final evaluation (every rank reads the windows, each cp rank its segments) and the
    final weights against one process."""
    ref_losses, ref_weights, ref_validation = reference
    got = losses(run_dir)
    assert len(got) == len(ref_losses), (got, ref_losses)
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) < LOSS_TOL, (got, ref_losses)
    assert len(validation(run_dir)) == len(ref_validation) == 1
    assert abs(validation(run_dir)[0] - ref_validation[0]) < LOSS_TOL, (validation(run_dir), ref_validation)
    assert max_rel(weights(run_dir), ref_weights) < WEIGHT_TOL


@pytest.fixture(scope="module")
def reference(corpus, workdir):
    """One process, global batch 4 in 2 micro-batches, 3 steps."""
    return one_process(options(corpus, workdir), workdir / "one")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process(two_ranks, corpus, workdir, reference, kind):
    run = workdir / f"two-{kind}"
    two_ranks().run(train_tasks.train_on_ranks, options(corpus, workdir, parallel=kind), str(run))
    compare(run, reference)


def test_a_2x2_mesh_trains_like_one_process(ranks, corpus, workdir, reference):
    """2 data-parallel replicas of 2 chunk-parallel ranks: every 64-token window split into two 32-token segments,
    each row's state carried across windows."""
    run = workdir / "mesh"
    ranks().run(train_tasks.train_on_ranks, options(corpus, workdir, chunk_parallel=2), str(run))
    compare(run, reference)


@pytest.mark.parametrize("mesh", ["fsdp", "2x2"])
def test_activation_checkpointing_on_ranks_trains_like_one_process(two_ranks, ranks, corpus, workdir, reference,
                                                                    mesh):
    """Each block recomputed in backward, under FSDP2 (its all-gathers again in the recomputation) and on the
    2 x 2 mesh (the chunk-parallel exchanges again, in the same order on every rank): as one process without it."""
    run = workdir / f"checkpointed-{mesh}"
    extra = {"parallel": "fsdp"} if mesh == "fsdp" else {"chunk_parallel": 2}
    pool = two_ranks() if mesh == "fsdp" else ranks()
    pool.run(train_tasks.train_on_ranks, options(corpus, workdir, activation_checkpointing=True, **extra), str(run))
    compare(run, reference)


def test_an_fp16_overflow_in_one_ranks_shard_skips_the_step_on_every_rank(two_ranks, corpus, workdir):
    """FSDP2 shards the gradients, so an overflow may show in one rank's shard alone: every rank must skip that
    step and halve its loss scale (torch.amp.GradScaler's check, all-reduced over DTensor gradients), as one
    process does with the same overflow."""
    values = options(corpus, workdir, dtype="fp16", max_steps=4)
    alone = workdir / "fp16-one"
    assert train_tasks.train_with_an_overflow(values, str(alone), 2) == 2.0 ** 15
    run = workdir / "fp16-fsdp"
    assert two_ranks().run(train_tasks.train_with_an_overflow, {**values, "parallel": "fsdp"}, str(run), 2) == \
        [2.0 ** 15] * 2  # each rank's own scale
    for path in (alone, run):
        records = [r for r in strict_records(path / "metrics.jsonl") if "loss" in r]
        assert [(r["loss_scale"], r["skipped_steps"]) for r in records] == \
            [(2.0 ** 16, 0), (2.0 ** 16, 1), (2.0 ** 15, 1), (2.0 ** 15, 1)]
    assert max(abs(a - b) for a, b in zip(losses(run), losses(alone))) < 1e-4
    # fp16 rounds a rank's rows otherwise than one process does, which AdamW's normalized updates carry into the
    # weights as a fraction of lr (measured 4e-3; fp32 runs agree to 1e-5)
    assert max_rel(weights(run), weights(alone)) < 1e-2


def test_each_rank_draws_its_own_dropout_masks(two_ranks):
    """Every rank seeds the same generator to build the same weights; a training step then reseeds each rank from
    (seed, step, rank), so that the replicas' rows get masks of their own, the same again for the same step."""
    rank0, rank1 = two_ranks().run(train_tasks.dropout_masks, 0, 7)  # each rank's mask, drawn twice
    assert rank0[0] == rank0[1] and rank1[0] == rank1[1]  # reproducible: a resumed step draws the same
    assert rank0[0] != rank1[0]
    assert len({step_seed(0, step, rank) for step in range(50) for rank in range(8)}) == 400


def test_a_run_with_dropout_on_two_ranks_resumes_exactly(two_ranks, corpus, workdir):
    values = options(corpus, workdir, max_steps=4, grad_accum=1, parallel="ddp",
                     model={"chunk_size": 16, "dropout": 0.1, "attention_dropout": 0.1})
    straight, stopped = workdir / "dropout-straight", workdir / "dropout-stopped"
    assert two_ranks().run(train_tasks.train_recording_seeds, values, str(straight)) == [[0, 1, 2, 3]] * 2
    two_ranks().run(train_tasks.train_on_ranks, values, str(stopped), False, 2)
    two_ranks().run(train_tasks.train_on_ranks, values, str(stopped), True)
    assert len(losses(straight)) == 4 and losses(stopped) == losses(straight)


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_on_four(two_ranks, ranks, corpus, workdir):
    """Stopped at step 2 on 2 FSDP ranks (a sharded checkpoint, with every row's carried state), then continued
    to step 5 in one process, and on 4 DDP ranks (one row each): both equal an uninterrupted process."""
    values = options(corpus, workdir, max_steps=5, grad_accum=1)
    reference = one_process(values, workdir / "one-5")
    stopped = workdir / "stopped"
    two_ranks().run(train_tasks.train_on_ranks, values, str(stopped), False, 2)
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-0000002"]
    sharded = stopped / "checkpoints" / "step-0000002"
    assert (sharded / "dcp" / ".metadata").is_file()
    # the sharded checkpoint's model, read whole, and consolidated, is the one process's model at step 2
    train(TrainConfig(**values), workdir / "one-2", progress=False, stop_at_step=2)
    at_two = load_file(str(workdir / "one-2" / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert max_rel(load_pretrained(sharded).state_dict(), at_two) < WEIGHT_TOL
    assert main(["convert", "consolidate", str(sharded), str(workdir / "consolidated")]) == 0
    assert max_rel(load_file(str(workdir / "consolidated" / "model.safetensors")), at_two) < WEIGHT_TOL

    damaged = workdir / "damaged"
    shutil.copytree(stopped, damaged)
    shard = next((damaged / "checkpoints" / "step-0000002" / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"refusing to resume: .*dcp/{shard.name} does not match"):
        train(TrainConfig(**values), damaged, resume=True, progress=False)

    on_one = workdir / "resumed-1"
    shutil.copytree(stopped, on_one)
    train(TrainConfig(**values), on_one, resume=True, progress=False)
    compare(on_one, reference)

    on_four = workdir / "resumed-4"
    shutil.copytree(stopped, on_four)
    ranks().run(train_tasks.train_on_ranks, {**values, "parallel": "ddp"}, str(on_four), True)
    compare(on_four, reference)


def test_a_checkpoint_of_one_process_resumes_on_two_ranks(two_ranks, corpus, workdir):
    """The other way: a one-process checkpoint (model.safetensors, index-keyed optimizer moments, one stream file
    per micro-batch) continued on 2 FSDP ranks, each taking its shard of the whole files."""
    values = options(corpus, workdir, max_steps=5)
    reference = one_process(values, workdir / "one-5-accum")
    stopped = workdir / "one-stopped"
    train(TrainConfig(**values), stopped, progress=False, stop_at_step=2)
    two_ranks().run(train_tasks.train_on_ranks, values, str(stopped), True)
    compare(stopped, reference)


def test_shapes_that_do_not_split_are_refused_on_every_rank(two_ranks, corpus, workdir):
    """Each rank must be able to take an equal share: every rank raises the same error (none waits for the other)."""
    rows = two_ranks().run(train_tasks.error_on_ranks, options(corpus, workdir, batch_size=2, grad_accum=2),
                           str(workdir / "bad-rows"))
    assert rows[0] == rows[1] and "batch_size (2) must be a multiple of the data-parallel ranks x grad_accum " \
                                  "(2 x 2 = 4)" in rows[0], rows
    segments = two_ranks().run(train_tasks.error_on_ranks, options(corpus, workdir, chunk_parallel=2, seq_len=48),
                               str(workdir / "bad-segments"))
    assert segments[0] == segments[1] and "seq_len (48) must be a multiple of chunk_parallel x chunk_size " \
                                          "(2 x 16 = 32)" in segments[0], segments
    graphed = two_ranks().run(train_tasks.error_on_ranks, options(corpus, workdir, cuda_graphs=True),
                              str(workdir / "graphed"))
    assert graphed[0] == graphed[1] and "--cuda_graphs true is for one process" in graphed[0], graphed


def test_chunk_parallel_in_one_process_names_the_launch(corpus, workdir):
    with pytest.raises(ValueError, match="--chunk_parallel 2 splits sequences across ranks, and this is one process: "
                                         "launch with --nproc N"):
        train(TrainConfig(**options(corpus, workdir, chunk_parallel=2)), workdir / "alone", progress=False)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(two_ranks, corpus, workdir):
    """SIGTERM reaches rank 1 alone, mid-run: both ranks stop after the same step and write its checkpoint, which
    resumes exactly (as in one process, docs/reliability.md)."""
    # in warmup throughout, the schedule does not depend on max_steps, which the resume below shortens
    values = options(corpus, workdir, max_steps=400, warmup_steps=1000, checkpoint_every=2, grad_accum=1)
    run = workdir / "signalled"
    pool = two_ranks()

    def signal_rank_1():
        deadline = time.monotonic() + 60
        while not list_checkpoints(run) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pool._procs[1].pid, signal.SIGTERM)

    sender = threading.Thread(target=signal_rank_1)
    sender.start()
    results = pool.run(train_tasks.train_on_ranks, values, str(run))
    sender.join()
    assert [r["stopped_by"] for r in results] == [signal.SIGTERM] * 2, results
    assert results[0]["steps"] == results[1]["steps"] < 400, results
    step = results[0]["steps"]
    assert list_checkpoints(run)[-1].name == f"step-{step:07d}"

    short = {**values, "max_steps": step + 1}
    train(TrainConfig(**short), run, resume=True, progress=False)
    compare(run, one_process(short, workdir / "uninterrupted"))
