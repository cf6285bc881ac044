"""A one-line loader module saved beside the weights, for tools that only know `trust_remote_code=True`.

A process that never imports megalodon.hf (the lm_eval CLI, say) has no "megalodon" model type registered.
The config's `auto_map` points such a process at this module, which imports the installed package: it holds
an import, not a copy of the model code.
"""

from __future__ import annotations

from pathlib import Path

MODULE = "megalodon_hf"
AUTO_MAP = {"AutoConfig": f"{MODULE}.MegalodonHFConfig", "AutoModelForCausalLM": f"{MODULE}.MegalodonForCausalLM"}
SOURCE = (
    '"""Loads the Megalodon classes of the installed megalodon-torch (pip install megalodon-torch[hf])."""\n'
    "from megalodon.hf import MegalodonForCausalLM, MegalodonHFConfig  # noqa: F401\n"
)


def write_loader_module(directory: str | Path) -> None:
    (Path(directory) / f"{MODULE}.py").write_text(SOURCE)
