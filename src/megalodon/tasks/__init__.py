"""Long-context tasks: seeded generators with train and test splits, scorers, a classification head, a training
loop and recipes that train a tiny model on each in minutes on CPU. See docs/long-context.md.

    from megalodon.tasks import make_task, recipe, build_task_model, train_task, evaluate_task
    task, cfg = recipe("recall")
    model = build_task_model(task, cfg)
    train_task(model, task, cfg)
    evaluate_task(model, make_task("recall", gap=256), task.examples("test", 200))
"""

from megalodon.tasks.base import (CLASSIFICATION, SEQUENCE, SPLITS, Example, Task, TaskBatch, collate, example_rng,
                                  score, score_classes, score_sequences)
from megalodon.tasks.listops import ListOps
from megalodon.tasks.models import (SequenceClassifier, build_task_model, load_task_model, save_task_model,
                                    use_real_ema)
from megalodon.tasks.passkey import Passkey
from megalodon.tasks.recall import AssociativeRecall, SelectiveCopy
from megalodon.tasks.recipes import RECIPES, recipe
from megalodon.tasks.registry import TASKS, make_task, parse_option
from megalodon.tasks.train import answer_chance, evaluate_task, predict, task_loss, train_task

__all__ = [
    "CLASSIFICATION", "SEQUENCE", "SPLITS", "TASKS", "RECIPES",
    "Example", "Task", "TaskBatch", "Passkey", "AssociativeRecall", "SelectiveCopy", "ListOps", "SequenceClassifier",
    "collate", "example_rng", "score", "score_classes", "score_sequences", "make_task", "parse_option", "recipe",
    "build_task_model", "use_real_ema", "save_task_model", "load_task_model",
    "task_loss", "train_task", "predict", "evaluate_task", "answer_chance",
]
