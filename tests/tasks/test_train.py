"""Recipes run, the training loop learns, and the `megalodon tasks` command works end to end."""

import json

import pytest

from megalodon.cli import main
from megalodon.tasks import RECIPES, build_task_model, evaluate_task, recipe, train_task
from megalodon.tasks.recipes import held_out_task

from tasks.task_helpers import SMALL, TEXTS


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_runs_a_few_steps_at_a_tiny_size(name):
    options = {"texts": TEXTS, "length": 200} if name == "passkey" else {}
    task, cfg = recipe(name, options, model={**RECIPES[name].train.get("model", {}), **SMALL}, max_steps=2,
                       batch_size=2, log_every=1)
    model = build_task_model(task, cfg)
    records = train_task(model, task, cfg, task.examples("test", 2))
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 for r in records)
    assert ("accuracy" if name == "listops" else "exact_match") in records[-1]


def test_training_learns_a_short_recall():
    """Gap 0, two pairs from four keys: a tiny model gets well past chance (1/4) in 150 steps."""
    task, cfg = recipe("recall", {"num_pairs": 2, "gap": 0, "num_keys": 4, "num_values": 4}, model=SMALL,
                       max_steps=150, batch_size=16, lr=1e-2, warmup_steps=10)
    model = build_task_model(task, cfg)
    records = train_task(model, task, cfg)
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert evaluate_task(model, task, task.examples("test", 64))["token_accuracy"] > 0.6


def test_recipe_test_settings_layer_over_training_settings():
    assert held_out_task("recall").gap == 64 and held_out_task("recall", {"gap": 300}).gap == 300
    task, cfg = recipe("recall", cli_overrides=["--max_steps", "7", "--model.chunk_size", "16"])
    assert cfg.max_steps == 7 and cfg.model["chunk_size"] == 16 and task.gap == RECIPES["recall"].task["gap"]


def test_cli_trains_evaluates_and_names_bad_input(tmp_path, capsys):
    out = tmp_path / "model"
    small = [f"--model.{k}={v}" for k, v in SMALL.items()]
    assert main(["tasks", "copy", "--train", "--out", str(out), "--max_steps", "2", "--batch_size", "2",
                 "--examples", "4", "-o", "gap=0:8", *small]) == 0
    assert (out / "task.json").is_file() and (out / "model.safetensors").is_file()
    result = tmp_path / "eval.json"
    assert main(["tasks", "copy", "--eval", str(out), "-o", "gap=40", "--examples", "4", "--json", str(result)]) == 0
    scored = json.loads(result.read_text())
    assert scored["examples"] == 4 and scored["settings"]["gap"] == 40 and 0 <= scored["exact_match"] <= 1
    capsys.readouterr()
    assert main(["tasks", "recall", "--eval", str(out)]) == 2
    assert "trained on 'copy', not 'recall'" in capsys.readouterr().err
    assert main(["tasks", "copy", "--train"]) == 2
    assert "--train needs --out" in capsys.readouterr().err
    assert main(["tasks", "copy", "--show", "-o", "spam=1"]) == 2
    assert "no option 'spam'" in capsys.readouterr().err
    assert main(["tasks", "copy", "--show", "--examples", "1"]) == 0
    assert "answer" in capsys.readouterr().out
