"""Task models on top of the public model classes: the classification head, the real-EMA ablation, and the
task model directory (task.json + model.safetensors).

Nothing here edits the model code: the classifier swaps the language model's output projection for the
identity (so its "logits" are the final normalized hidden states) and reads them at each row's last token; the
real-EMA ablation pins every CEMA angle to zero through its parameter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from megalodon.baseline import Llama
from megalodon.model import Megalodon
from megalodon.tasks.base import CLASSIFICATION, Task
from megalodon.tasks.registry import make_task
from megalodon.training.config import TrainConfig
from megalodon.training.models import build_model

TASK_FILE, WEIGHTS_FILE = "task.json", "model.safetensors"
TASK_MODEL_FORMAT = "megalodon-task-model/1"
EMA_KINDS = ("complex", "real")
# sigmoid(-1e4) is exactly 0 in fp32 and float64, so every angle phi = (n+1) sigmoid(theta) 2 pi / N is exactly 0
# and the decay q = |q| is real: Megalodon's CEMA becomes MEGA's real damped EMA (the paper's EMA ablation).
REAL_EMA_THETA = -1e4


class SequenceClassifier(nn.Module):
    """A language model's trunk and a linear head on its final state: the hidden state after each row's last
    token (rows are right-padded; the trunk is causal, so padding never reaches a row's last real token)."""

    def __init__(self, backbone: Megalodon | Llama, num_classes: int):
        super().__init__()
        if isinstance(backbone, Megalodon):
            backbone.output.output = nn.Identity()
        elif isinstance(backbone, Llama):
            backbone.lm_head = nn.Identity()
        else:
            raise TypeError(f"SequenceClassifier needs a Megalodon or a Llama, got {type(backbone).__name__}")
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.model_dim, num_classes)

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """(B, L) token ids and (B,) real lengths -> (B, num_classes) logits in fp32."""
        if lengths.shape != input_ids.shape[:1] or bool((lengths < 1).any() | (lengths > input_ids.shape[1]).any()):
            raise ValueError(f"lengths must be ({input_ids.shape[0]},) values in [1, {input_ids.shape[1]}], "
                             f"got {lengths.tolist()}")
        hidden = self.backbone(input_ids)  # B x L x D: the final-normed states
        last = hidden[torch.arange(input_ids.shape[0], device=hidden.device), lengths - 1]
        return self.head(last.to(self.head.weight.dtype)).float()


def use_real_ema(model: Megalodon) -> None:
    """Pin every CEMA angle at 0 and freeze it: the real-valued EMA of the paper's ablation."""
    if not isinstance(model, Megalodon):
        raise ValueError(f"the real-EMA ablation applies to Megalodon, not to a {type(model).__name__}")
    for block in model.layers:
        theta = block.mega.cema.theta
        with torch.no_grad():
            theta.fill_(REAL_EMA_THETA)
        theta.requires_grad_(False)


def build_task_model(task: Task, cfg: TrainConfig, ema: str = "complex") -> nn.Module:
    """The model cfg describes (arch, preset, model overrides), sized to the task's vocabulary, seeded by cfg.seed;
    wrapped in a classifier for classification tasks."""
    if ema not in EMA_KINDS:
        raise ValueError(f"ema must be one of {EMA_KINDS}, got {ema!r}")
    if ema == "real" and cfg.arch != "megalodon":
        raise ValueError("ema='real' is the Megalodon ablation; the Llama has no EMA")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task.vocab_size)
    if ema == "real":
        use_real_ema(model)
    if task.kind == CLASSIFICATION:
        model = SequenceClassifier(model, task.num_classes)
    return model


def backbone_of(model: nn.Module) -> Megalodon | Llama:
    return model.backbone if isinstance(model, SequenceClassifier) else model


def save_task_model(directory: str | Path, model: nn.Module, task: Task, cfg: TrainConfig, ema: str,
                    results: dict | None = None) -> Path:
    """task.json (the task, its settings, the training config, the EMA kind, results) and the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS_FILE))
    meta = {"format": TASK_MODEL_FORMAT, "task": task.name, "settings": task.settings(), "train": cfg.to_dict(),
            "ema": ema, "results": results or {}}
    (directory / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_task_model(directory: str | Path) -> tuple[nn.Module, Task, TrainConfig, dict]:
    """The model, its task (as trained), its training config and the whole task.json; weights loaded strictly."""
    directory = Path(directory)
    path = directory / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a task model directory (no {TASK_FILE}); train one with "
                                "`megalodon tasks NAME --train --out DIR`")
    meta = json.loads(path.read_text())
    if meta.get("format") != TASK_MODEL_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {TASK_MODEL_FORMAT!r}")
    task = make_task(meta["task"], **meta["settings"])
    cfg = TrainConfig.from_dict(meta["train"])
    model = build_task_model(task, cfg, meta["ema"])
    load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    return model.eval(), task, cfg, meta
