"""Hugging Face integration: transformers config/model/cache/tokenizer adapters and lm-eval task files.

Importing this package registers the "megalodon" model type with AutoConfig and AutoModelForCausalLM.
It needs the `hf` extra (transformers); lm-eval runs need the `eval` extra. `import megalodon` never imports it.
"""

from __future__ import annotations

from megalodon.optional import install_step

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"megalodon.hf needs transformers: {install_step('transformers')}") from err

from megalodon.hf.cache import MegalodonCache
from megalodon.hf.configuration import MegalodonHFConfig
from megalodon.hf.convert import export_hf, import_hf, wrap
from megalodon.hf.harness import lm_eval_task
from megalodon.hf.modeling import MegalodonForCausalLM
from megalodon.hf.tokenizer import save_hf_tokenizer, to_hf_tokenizer

# The `<Model>Config` name transformers users expect beside MegalodonForCausalLM. `megalodon.MegalodonConfig` is the
# core dataclass that this config wraps field for field (`MegalodonHFConfig.to_core()` / `.from_core()`).
MegalodonConfig = MegalodonHFConfig


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM resolve model_type "megalodon" to our classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MegalodonHFConfig.model_type, MegalodonHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(MegalodonHFConfig, MegalodonForCausalLM, exist_ok=True)


register()

__all__ = [
    "MegalodonCache", "MegalodonConfig", "MegalodonForCausalLM", "MegalodonHFConfig",
    "export_hf", "import_hf", "lm_eval_task", "register", "save_hf_tokenizer", "to_hf_tokenizer", "wrap",
]
