"""The trainer end to end on a tiny model: exact resume, refused corruption, clear errors."""

import json
import math

import pytest
import torch
from helpers import tiny_config
from host_syncs import counted_host_syncs, device_value_checks

from megalodon import Megalodon
from megalodon.baseline import Llama
from megalodon.training.checkpoint import list_checkpoints
from megalodon.training.trainer import Trainer, train
from training_helpers import losses


def test_resume_continues_exactly(make_config, tmp_path):
    cfg = make_config()
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_at_step=4)
    assert len(losses(tmp_path / "resumed")) == 4
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == 8 and straight == resumed  # to the bit
    run = tmp_path / "resumed"
    assert (run / "loss.png").is_file() and (run / "summary.txt").is_file() and (run / "model").is_dir()


def test_corrupt_checkpoint_is_refused_and_the_previous_one_kept(make_config, tmp_path):
    cfg = make_config()
    train(cfg, tmp_path / "run", progress=False)
    first, latest = list_checkpoints(tmp_path / "run")[-2:]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(ValueError, match="does not match its recorded size/hash.*previous checkpoint"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    assert (first / "manifest.json").is_file()


def test_llama_baseline_trains_on_the_same_tokens(make_config, tmp_path):
    result = train(make_config(arch="llama", max_steps=4), tmp_path / "llama", progress=False)
    assert result.steps == 4 and result.val_bpb > 0
    assert json.loads((tmp_path / "llama" / "model" / "config.json").read_text())["architecture"] == "llama"


def test_a_different_run_in_the_directory_is_refused(make_config, tmp_path):
    train(make_config(max_steps=2), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(make_config(max_steps=2), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="different run.*lr"):
        train(make_config(max_steps=2, lr=1e-4), tmp_path / "run", resume=True, progress=False)


def test_bad_data_and_vocab_are_refused(make_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        train(make_config(data=str(tmp_path / "nothing")), tmp_path / "a", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(ValueError, match="documents|text"):
        train(make_config(data=str(empty)), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train(make_config(model={"chunk_size": 16, "vocab_size": 300}), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        train(make_config(seq_len=40), tmp_path / "d", progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer '/missing.json': no such file"):
        train(make_config(tokenizer="/missing.json"), tmp_path / "e", progress=False)


def test_cli_quick_run_and_clear_errors(corpus, tmp_path, capsys):
    from megalodon.cli import main

    args = ["train", "--quick", "--run-dir", str(tmp_path / "cli"), "--data", str(corpus), "--data_dir",
            str(tmp_path / "data"), "--max_steps", "3", "--model.chunk_size", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation bits/byte" in out and (tmp_path / "cli" / "loss.png").is_file()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--quick", "--max_stesp", "3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def test_activation_checkpointing_does_not_change_the_losses(make_config, tmp_path):
    plain = train(make_config(max_steps=3), tmp_path / "plain", progress=False)
    recomputed = train(make_config(max_steps=3, activation_checkpointing=True), tmp_path / "ckpt", progress=False)
    assert abs(plain.val_loss - recomputed.val_loss) < 1e-6
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "plain"), losses(tmp_path / "ckpt"))) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("arch", [Megalodon, Llama])
def test_compile_gives_the_eager_losses(make_config, tmp_path, monkeypatch, arch):
    """--compile true compiles each block, with activation checkpointing inside: the carried state, the document
    resets, evaluation and sampling run through it to eager's losses. Through AOTAutograd without Inductor's
    code generation, which takes minutes per graph on 2 cores (tests/test_model.py runs Inductor on a block)."""
    compile_blocks, compiled_models = arch.compile_blocks, []

    def without_codegen(model, **options):
        compiled_models.append(model)
        return compile_blocks(model, backend="aot_eager", **options)

    monkeypatch.setattr(arch, "compile_blocks", without_codegen)
    options = dict(arch=arch.__name__.lower(), max_steps=3, checkpoint_every=0, activation_checkpointing=True)
    plain = train(make_config(**options), tmp_path / "plain", progress=False)
    compiled = train(make_config(compile=True, **options), tmp_path / "compiled", progress=False)
    assert len(compiled_models) == 1
    assert abs(plain.val_loss - compiled.val_loss) < 1e-4
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "plain"), losses(tmp_path / "compiled"))) < 1e-4


def test_compile_mode_reaches_torch_compile(make_config, tmp_path, monkeypatch):
    """--compile_mode goes to every block's torch.compile (recorded here, not compiled); "default" passes none, so
    that a backend given elsewhere does not meet a mode; a mode without --compile is refused."""
    seen = []
    monkeypatch.setattr(Megalodon, "compile_blocks", lambda model, **options: seen.append(options) or model)
    for mode in ("default", "reduce-overhead"):
        train(make_config(compile=True, compile_mode=mode, max_steps=1, checkpoint_every=0), tmp_path / mode,
              progress=False)
    assert seen == [{}, {"mode": "reduce-overhead"}]
    with pytest.raises(ValueError, match="compile_mode"):
        make_config(compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="compile_mode"):
        make_config(compile=True, compile_mode="fast")


def test_graph_replaying_steps_take_the_least_gpu_work(make_config):
    """Under blocks that replay CUDA graphs the trainer's forward runs in launches_without_host_cost (a long
    chunk's queries in blocks at any length, ops/attention.py); otherwise the ops keep their eager rule."""
    from megalodon.ops import attention
    from megalodon.training.compute import graph_launches

    with graph_launches(make_config(compile=True, compile_mode="reduce-overhead")):
        assert not attention._launches_cost_host
    with graph_launches(make_config(compile=True)):
        assert attention._launches_cost_host
    assert attention._launches_cost_host


def test_carried_states_leave_the_cuda_graphs_memory(make_config):
    """With blocks that replay CUDA graphs (reduce-overhead, max-autotune), the state carried to the next step or
    validation window is a copy (the next replay overwrites the graphs' outputs); otherwise it is the detached
    state itself, no copy."""
    from megalodon.training.compute import carried

    _, state = Megalodon(tiny_config()).float()(torch.randint(0, 64, (1, 12)), return_state=True)
    plain = carried(state, make_config())
    copied = carried(state, make_config(compile=True, compile_mode="reduce-overhead"))
    pairs = list(zip(state.tensors().values(), plain.tensors().values(), copied.tensors().values()))
    assert pairs and all(not p.requires_grad and not c.requires_grad for _, p, c in pairs)
    assert all(p.data_ptr() == s.data_ptr() for s, p, _ in pairs if s.numel())
    assert all(c.data_ptr() != s.data_ptr() and torch.equal(c, s) for s, _, c in pairs if s.numel())
    assert carried(None, make_config()) is None


def test_a_time_budget_fixes_max_steps_at_the_end_of_warmup(make_config, tmp_path):
    cfg = make_config(max_steps=0, time_budget_min=0.02, warmup_steps=6, checkpoint_every=0)
    result = train(cfg, tmp_path / "budget", progress=False)
    assert result.steps >= 7 and result.val_bpb > 0
    state = json.loads((list_checkpoints(tmp_path / "budget")[-1] / "trainer_state.json").read_text())
    assert state["max_steps"] == result.steps


def test_a_time_budget_run_shows_no_total_until_it_knows_one(make_config, tmp_path, monkeypatch):
    """Until the budget is turned into steps the bar counts steps without a total (it once showed 5/5, then 6/5
    at 120%); from then on it never passes its total, and ends on it."""
    from megalodon.progress import LogProgress
    from megalodon.training import trainer as trainer_module

    seen = []

    class Recording(LogProgress):
        def update(self, n: int = 1) -> None:
            super().update(n)
            seen.append((self.n, self.total))

    monkeypatch.setattr(trainer_module, "progress_bar", lambda total=None, desc="", disable=False, initial=0, **_:
                        Recording(total, desc, initial, 0.0, 3600.0))
    cfg = make_config(max_steps=0, time_budget_min=0.02, warmup_steps=6, checkpoint_every=0)
    result = train(cfg, tmp_path / "budget", progress=True)
    assert seen[0][1] is None and all(total is None or n <= total for n, total in seen), seen
    assert seen[-1] == (result.steps, result.steps)


def test_the_token_store_follows_edits_of_the_training_files(make_config, corpus, tmp_path):
    from megalodon.training.data import prepare_data

    cfg = make_config()
    before, _ = prepare_data(cfg)
    for path in corpus.iterdir():  # same sizes, new text: only the content says it changed
        path.write_text(path.read_text().upper())
    after, _ = prepare_data(cfg)
    assert before != after
    assert (after / "train.bin").read_bytes() != (before / "train.bin").read_bytes()
    assert prepare_data(cfg)[0] == after


def test_files_edited_while_their_store_is_built_leave_no_store(make_config, corpus, monkeypatch, tmp_path):
    """An edit during the build (same document count: the build's own check cannot see it) is caught by the
    files' sizes and times, which name the store: the store is removed, and the next run builds it afresh."""
    from megalodon.data import SPLITS, TokenStore, token_store
    from megalodon.training import data

    cfg = make_config()
    write, edited = token_store._SplitWriter.add, []

    def add_then_edit(writer, text):
        write(writer, text)
        if not edited:  # the user saves a file while the first document is tokenized
            path = sorted(corpus.iterdir())[0]
            path.write_text(path.read_text() + " and one more line\n")
            edited.append(path)

    monkeypatch.setattr(token_store._SplitWriter, "add", add_then_edit)
    with pytest.raises(RuntimeError, match="changed while their token store was built: run again"):
        data.prepare_data(cfg)
    assert not [store for store in (tmp_path / "data" / "stores").glob("user-*") if store.is_dir()]
    monkeypatch.undo()
    store, tokenizer = data.prepare_data(cfg)
    texts = [tokenizer.decode(split.document(i)) for split in map(lambda name: TokenStore(store, name), SPLITS)
             for i in range(split.n_docs)]
    assert sum("and one more line" in text for text in texts) == 1
    assert data.prepare_data(cfg)[0] == store


def test_extending_a_finished_run_continues_at_the_final_learning_rate(make_config, tmp_path, caplog):
    run = tmp_path / "run"
    train(make_config(max_steps=6), run, progress=False)
    with caplog.at_level("INFO", logger="megalodon"):
        result = train(make_config(max_steps=9), run, resume=True, progress=False)
    assert result.steps == 9 and "extending the run from 6 to 9 steps" in caplog.text
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "loss" in r]
    assert len(lrs) == 9 and lrs[6:] == [pytest.approx(3e-5)] * 3  # the floor where the 6-step schedule ended
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 9
    assert "trained    9 steps" in (run / "summary.txt").read_text()
    with pytest.raises(ValueError, match="already at step 9"):
        train(make_config(max_steps=7), run, resume=True, progress=False)
    with pytest.raises(ValueError, match="fixed at 9 steps; change it with --max_steps N, not --time_budget_min"):
        train(make_config(max_steps=9, time_budget_min=1.0), run, resume=True, progress=False)


def test_a_changed_model_shape_is_refused_on_resume(config_file, tmp_path, capsys):
    from megalodon.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "--config", str(config_file(max_steps=2)), "--run-dir", run]) == 0
    assert main(["train", "--resume", "--run-dir", run, "--model.chunk_size", "32"]) == 2
    assert "model" in capsys.readouterr().err
    assert main(["train", "--resume", "--run-dir", run, "--max_steps", "3"]) == 0


def test_throughput_counts_training_time_alone(make_config, tmp_path, monkeypatch):
    import time

    from megalodon.training import trainer

    evaluate = trainer.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(1.0)
        return evaluate(*args, **kwargs)
    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    result = train(make_config(max_steps=4, eval_every=2), tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["wall_s"] > summary["train_s"] + 2.0
    assert result.tokens_per_s == summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_s"])
    assert "wall-clock" in (tmp_path / "run" / "summary.txt").read_text()


def test_compare_reports_training_throughput_and_resumes_from_its_saved_options(config_file, tmp_path, capsys):
    from megalodon.cli import main

    out = tmp_path / "compare"
    assert main(["compare", "--config", str(config_file(max_steps=2)), "--run-dir", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert "tokens/s (training)" in text and "training throughput ratio megalodon/llama" in text
    for arch in ("megalodon", "llama"):
        summary = json.loads((out / arch / "summary.json").read_text())
        assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_s"])
    assert main(["compare", "--resume", "--run-dir", str(out), "--max_steps", "3"]) == 0
    assert [json.loads((out / a / "summary.json").read_text())["steps"] for a in ("megalodon", "llama")] == [3, 3]


@pytest.mark.parametrize("stateful", [False, True])
def test_a_step_waits_for_the_device_once_however_many_micro_batches(make_config, tmp_path, monkeypatch, stateful):
    """Reading each micro-batch's loss on the host would stall a GPU's queue once per micro-batch: the losses add up
    on the device, and the step reads them with the gradient norm in one go (the divergence check needs both
    before the optimizer runs). The other read is the label count of the batch, on the host before it moves."""
    device_value_checks(monkeypatch)  # the model's value checks as on a GPU: device assertions, not reads
    reads = {}
    for accum in (1, 4):
        with Trainer(make_config(grad_accum=accum, stateful=stateful), tmp_path / f"run{accum}",
                     progress=False) as trainer:
            trainer.train_step()  # the first step makes the optimizer's state
            with counted_host_syncs() as found:
                loss = trainer.train_step()
            reads[accum] = found
            assert math.isfinite(loss) and math.isfinite(trainer.grad_norm) and trainer.grad_norm > 0
    assert len(reads[1]) == len(reads[4]) == 2, reads


def test_evaluation_waits_for_the_device_once_however_many_windows(make_config, tmp_path, monkeypatch):
    """The validation losses add up on the device and are read once at the end, not once a window (each read would
    drain a GPU's queue). The other reads are each window's label count, taken from its host copy."""
    from megalodon.data import eval_windows
    from megalodon.training.compute import evaluate

    device_value_checks(monkeypatch)
    cfg = make_config(seq_len=32, eval_batch_size=2)
    with Trainer(cfg, tmp_path / "run", progress=False) as trainer:
        windows = len(list(eval_windows(trainer.val_store, cfg.seq_len, trainer.chunk, trainer.pad_id,
                                        cfg.eval_batch_size)))
        with counted_host_syncs() as found:
            result = evaluate(trainer.model, trainer.val_store, cfg, trainer.chunk, trainer.pad_id, trainer.device)
    assert windows >= 3 and len(found) == windows + 1, (windows, found)
    assert math.isfinite(result["val_loss"]) and result["val_loss"] > 0
