"""The matched Transformer baseline: a Llama-style model sized to each Megalodon preset."""

from megalodon.baseline.cache import KVCache, StaticKVCache
from megalodon.baseline.llama import Llama, LlamaConfig
from megalodon.baseline.presets import LLAMA_PRESETS, count_llama_parameters, matched_llama_config

__all__ = ["Llama", "LlamaConfig", "KVCache", "StaticKVCache", "LLAMA_PRESETS", "matched_llama_config",
           "count_llama_parameters"]
