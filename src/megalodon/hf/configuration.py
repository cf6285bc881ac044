"""`MegalodonHFConfig`: the core `MegalodonConfig` as a transformers config, field for field.

The core dataclass stays the one source of truth: its field names, defaults and validation are reused here,
so a config that the core refuses is refused with the core's message.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from megalodon.config import MegalodonConfig

# A config built with no arguments (transformers does this, e.g. to diff against defaults) needs a vocab size;
# the core dataclass has none, so this one is the adapter's choice.
DEFAULT_VOCAB_SIZE = 32000


def core_defaults() -> dict:
    """Field name -> default of every MegalodonConfig field, in declaration order."""
    return {f.name: (DEFAULT_VOCAB_SIZE if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(MegalodonConfig)}


class MegalodonHFConfig(PretrainedConfig):
    """All MegalodonConfig fields under their own names, plus the special token ids and `use_cache`.

    `tie_word_embeddings` is derived from `share_emb` (transformers reads it to tie the output projection to the
    embedding); passing a contradicting value is an error.
    """

    model_type = "megalodon"
    # Names that generic tools (accelerate, DeepSpeed, lm-eval) look up on any config.
    attribute_map = {"hidden_size": "model_dim", "num_hidden_layers": "num_layers",
                     "num_attention_heads": "num_heads", "intermediate_size": "ffn_hidden_dim"}

    def __init__(self, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, use_cache: bool = True, **kwargs):
        # A megalodon model directory's config.json (read by AutoConfig through its model_type) names its architecture.
        architecture = kwargs.pop("architecture", "megalodon")
        if architecture != "megalodon":
            raise ValueError(f"this config describes the {architecture!r} architecture, not a Megalodon")
        core = {name: kwargs.pop(name, default) for name, default in core_defaults().items()}
        MegalodonConfig(**core)  # validates, with the core's error messages
        tied = kwargs.pop("tie_word_embeddings", core["share_emb"])
        if bool(tied) != bool(core["share_emb"]):
            raise ValueError(f"tie_word_embeddings={tied} contradicts share_emb={core['share_emb']}: "
                             "the output projection is tied to the embedding exactly when share_emb is True")
        for name, value in core.items():
            setattr(self, name, value)
        super().__init__(**kwargs)
        # Set after the base init: transformers 5 releases differ in which of these the base class declares.
        self.tie_word_embeddings = bool(core["share_emb"])
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.use_cache = use_cache

    def to_core(self) -> MegalodonConfig:
        return MegalodonConfig(**{name: getattr(self, name) for name in core_defaults()})

    @classmethod
    def from_core(cls, config: MegalodonConfig, **kwargs) -> "MegalodonHFConfig":
        """kwargs: bos_token_id, eos_token_id, pad_token_id and any other transformers config argument."""
        return cls(**config.to_dict(), **kwargs)
