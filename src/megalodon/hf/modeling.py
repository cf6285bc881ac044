"""`MegalodonForCausalLM`: the core Megalodon behind transformers' PreTrainedModel and GenerationMixin.

The core model is held whole as `self.model`, so its weights keep their core names under the prefix `model.`
and nothing of the architecture is re-implemented here. This file only translates conventions:
attention masks (padding), the cache object, labels and the output class.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megalodon.hf.cache import MegalodonCache
from megalodon.hf.configuration import MegalodonHFConfig
from megalodon.hf.export_code import package_only
from megalodon.hf.padding import forward_rows, real_token_spans
from megalodon.model import Megalodon
from megalodon.ops.loss import IGNORE_INDEX  # the label that transformers' losses skip too
from megalodon.validation import require

# transformers renamed `past_key_values` to `cache` during 5.x; use whichever name the installed version expects.
CACHE_ARG = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
             else "past_key_values")

_UNSUPPORTED = {
    "inputs_embeds": "Megalodon takes token ids only: pass input_ids",
    "output_attentions": "attention weights are not materialized (chunked SDPA)",
    "output_hidden_states": "hidden states are not returned by the core model",
}


class MegalodonForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegalodonHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # tells generate that the cache cannot be rolled back (no assisted decoding)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegalodonBlock"]
    # {target: source}; transformers applies it only when config.tie_word_embeddings (= share_emb) is True.
    _tied_weights_keys = {"model.output.output.weight": "model.embed.weight"}

    def __init__(self, config: MegalodonHFConfig):
        super().__init__(config)
        self.model = Megalodon(config.to_core())
        if config.tie_word_embeddings:  # saved once, as the embedding: what the Trainer's resume then expects
            self._keys_to_ignore_on_save = list(self._tied_weights_keys)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates a MegalodonCache itself; a DynamicCache would be ignored

    def _init_weights(self, module: nn.Module) -> None:
        # The core draws its reference initialization in its own constructor, and every tensor it owns (buffers
        # included) is persistent, so from_pretrained fills them all: transformers' generic init must not touch them.
        pass

    @package_only
    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save, plus the generated code files that `trust_remote_code=True` loads without this
        package (see remote_code.py). The exported class has no such override: transformers copies its own
        code files on save, because it was loaded as remote code."""
        from megalodon.hf.remote_code import AUTO_MAP, write_remote_code

        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        """What gradient_checkpointing_enable() / activation_checkpointing_enable() call: in training, every
        `every_n_layers`-th block recomputes its activations in backward instead of storing them."""
        for index, block in enumerate(self.model.layers):
            block.gradient_checkpointing = enable and index % every_n_layers == 0
            if block.gradient_checkpointing:
                plain = type(block).forward.__get__(block)
                block.forward = functools.partial(_checkpointed, block, plain, gradient_checkpointing_func)
            else:
                block.__dict__.pop("forward", None)  # back to the class's forward

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.output.output

    # resize_token_embeddings replaces the embedding, then the head (untied), then sets config.vocab_size itself:
    # the core's config follows, since it checks token ids and targets against it (a copy: another model may
    # share the object).
    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.model.embed = embeddings
        self.model.config = dataclasses.replace(self.model.config, vocab_size=embeddings.num_embeddings)
        self._output_size_from_head()

    def set_output_embeddings(self, head: nn.Linear) -> None:
        self.model.output.output = head
        self._output_size_from_head()

    def _output_size_from_head(self) -> None:
        outputs = self.model.output.output.weight.shape[0]
        output_size = -1 if outputs == self.model.config.vocab_size else outputs
        self.model.config = dataclasses.replace(self.model.config, output_size=output_size)
        self.config.output_size = output_size

    # ---- the forward pass ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: MegalodonCache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        past_key_values: MegalodonCache | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, L, V) fp32 and, with use_cache, the MegalodonCache after the last token.

        attention_mask: (B, L), or (B, past + L) when continuing a cache as generate passes it. Padding is
        allowed only in a call that starts the streams; each row then runs on its real tokens alone, and the
        logits at pad positions are zeros.
        cache / past_key_values: the stream so far (same object under transformers' old and new name); it is
        advanced in place and returned.
        labels: (B, L) token ids, IGNORE_INDEX where no loss is wanted; shifted inside (labels = input_ids works).
        logits_to_keep: return only the last N positions' logits (0 = all); generate asks for 1 in the prefill.
        num_items_in_batch: the labelled tokens of the whole optimizer step, which transformers' Trainer passes
        with gradient accumulation: the loss is then this call's summed cross-entropy over it, so that the
        micro-batches add up to the step's mean (the Trainer leaves such a loss undivided).
        """
        for name, why in _UNSUPPORTED.items():
            if kwargs.get(name) is not None and kwargs[name] is not False:
                raise ValueError(f"MegalodonForCausalLM does not support {name}: {why}")
        if input_ids is None:
            raise ValueError("MegalodonForCausalLM needs input_ids")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0 keeps all), got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("labels need the logits of every position: do not combine them with logits_to_keep")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training

        logits, cache = self._logits_and_cache(input_ids, attention_mask, cache, use_cache, logits_to_keep)
        loss = None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: cache})
        return output.to_tuple() if return_dict is False else output

    def _logits_and_cache(self, input_ids: Tensor, attention_mask: Tensor | None, cache: MegalodonCache | None,
                          use_cache: bool, logits_to_keep: int) -> tuple[Tensor, MegalodonCache | None]:
        length = input_ids.shape[1]
        if cache is not None:
            if not isinstance(cache, MegalodonCache):
                raise TypeError(f"cache must be a MegalodonCache (returned by an earlier call), got "
                                f"{type(cache).__name__}")
            if attention_mask is not None:  # checked without a host sync on a GPU
                require(attention_mask[:, -length:].bool().all(), "the new tokens of a call that continues a "
                        "cache must not be padded: only the first call of a stream (the prompt) may carry padding")
            if length == 1 and not torch.is_grad_enabled() and not self.model.training:
                return cache.decode_step(self.model, input_ids.to(torch.int64)), cache  # generate's steps
            logits, state = self.model(input_ids, state=cache.state, return_state=True, logits_to_keep=logits_to_keep)
            cache.advance(state, length)
            return logits, cache

        if attention_mask is not None and not bool(attention_mask.all()):
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                 f"{tuple(input_ids.shape)}; without a cache they must match")
            starts, lengths = real_token_spans(attention_mask)
            logits, state = forward_rows(self.model, input_ids, starts, lengths, logits_to_keep)
        elif use_cache:
            logits, state = self.model(input_ids, return_state=True, logits_to_keep=logits_to_keep)
        else:
            return self.model(input_ids, logits_to_keep=logits_to_keep), None
        return logits, (MegalodonCache(state, length) if use_cache else None)

    # ---- generation ------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self, input_ids: Tensor, cache: MegalodonCache | None = None, past_key_values: MegalodonCache | None = None,
        attention_mask: Tensor | None = None, use_cache: bool = True, logits_to_keep: int = 0, **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen: the whole prompt first, then one token per step."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("MegalodonForCausalLM.generate takes input_ids, not inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
            if input_ids.shape[1] == 0:
                raise ValueError(f"the cache has already seen all {cache.get_seq_length()} input tokens; pass "
                                 "the full sequence including at least one new token")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache,
                "logits_to_keep": logits_to_keep, CACHE_ARG: cache}


def _checkpointed(block: nn.Module, forward, checkpoint, *args, **kwargs):
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, **kwargs)
    return forward(*args, **kwargs)


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Cross-entropy of token t+1 given tokens <= t, skipping IGNORE_INDEX labels: the mean over this call's
    labelled tokens, or their sum divided by num_items_in_batch (the step's labelled tokens) when given."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} (batch, length), "
                         f"got {tuple(labels.shape)}")
    logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    summed = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(summed.device)
    return summed / num_items_in_batch
