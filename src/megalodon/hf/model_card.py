"""The model card (`README.md`) of an export: Hub metadata, how to load it, its config and how it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import megalodon
from megalodon.config import MegalodonConfig

PAPER = "https://arxiv.org/abs/2404.08801"
# What the trainer's summary.json and train_config.json hold, in the order the card lists them.
_SUMMARY_ROWS = (("steps", "optimizer steps", "{:,}"), ("tokens", "training tokens", "{:,}"),
                 ("val_loss", "validation loss (nats/token)", "{:.4f}"), ("val_ppl", "validation perplexity", "{:.2f}"),
                 ("val_bpb", "validation bits/byte", "{:.4f}"), ("train_s", "training time (s)", "{:,.0f}"))
_TRAIN_ROWS = (("data", "data"), ("tokenizer", "tokenizer"), ("preset", "preset"), ("seq_len", "sequence length"),
               ("batch_size", "batch size (sequences)"), ("lr", "peak learning rate"), ("schedule", "schedule"))


def training_record(model_dir: Path) -> tuple[dict, dict]:
    """(summary, train_config) of the run that wrote `model_dir`, when it is a run's `model/` (else empty)."""
    for directory in (model_dir, model_dir.parent):
        if (directory / "summary.json").is_file():
            summary = json.loads((directory / "summary.json").read_text())
            train_file = directory / "train_config.json"
            return summary, (json.loads(train_file.read_text()) if train_file.is_file() else {})
    return {}, {}


def model_card(config: MegalodonConfig, parameters: int, summary: dict | None = None,
               train_config: dict | None = None, has_tokenizer: bool = True) -> str:
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- megalodon", "- custom_code", "---", ""]
    load_tokenizer = ('tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n'
                      'ids = tokenizer("ROMEO:", return_tensors="pt").input_ids\n'
                      'print(tokenizer.decode(model.generate(ids, max_new_tokens=50, do_sample=True)[0]))\n'
                      if has_tokenizer else "")
    body = [
        f"# Megalodon, {parameters:,} parameters",
        "",
        f"A [Megalodon]({PAPER}) language model (Ma et al., 2024): a complex exponential moving average and a causal "
        "timestep normalization carry context across time, and attention runs only inside chunks of "
        f"{config.chunk_size} tokens, so memory stays constant however long the input. Exported by megalodon-torch "
        f"{megalodon.__version__}.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "path/to/this/directory"',
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        *load_tokenizer.splitlines(),
        "```",
        "",
        "The model's code is in `configuration_megalodon.py` and `modeling_megalodon.py`, generated from "
        "megalodon-torch: pure PyTorch, it needs only `torch` and `transformers`. The cache that `generate` carries "
        "is the recurrent state, of constant size.",
        "",
        "## Config",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| `{name}` | `{value}` |" for name, value in config.to_dict().items()),
    ]
    if summary or train_config:
        body += ["", "## Training", "", "| | |", "|---|---|"]
        body += [f"| {label} | `{train_config[key]}` |" for key, label in _TRAIN_ROWS if key in (train_config or {})]
        body += [f"| {label} | {fmt.format(summary[key])} |" for key, label, fmt in _SUMMARY_ROWS
                 if isinstance((summary or {}).get(key), (int, float))]
    return "\n".join(front + body) + "\n"
