"""Between our model directories (config.json + model.safetensors, core key names) and transformers' layout.

The transformers layout is what `MegalodonForCausalLM.save_pretrained` writes: the same tensors under the
prefix `model.`, a transformers config.json (model_type "megalodon"), generation_config.json and the generated,
self-contained code files for `trust_remote_code=True` (see remote_code.py); export_hf adds the tokenizer and a
model card. Conversion copies tensors unchanged, so a round trip is bit-exact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megalodon.data.tokenizer import Tokenizer, load_tokenizer
from megalodon.hf.configuration import MegalodonHFConfig
from megalodon.hf.model_card import model_card, training_record
from megalodon.hf.modeling import MegalodonForCausalLM
from megalodon.hf.tokenizer import save_hf_tokenizer
from megalodon.model import Megalodon


def wrap(model: Megalodon, **config_kwargs) -> MegalodonForCausalLM:
    """A MegalodonForCausalLM around `model` itself (parameters shared, nothing copied or re-initialized).

    config_kwargs: bos_token_id, eos_token_id, pad_token_id and other transformers config arguments.
    """
    if not isinstance(model, Megalodon):
        raise TypeError(f"expected a megalodon.Megalodon, got {type(model).__name__}")
    config = MegalodonHFConfig.from_core(model.config, **config_kwargs)
    with torch.device("meta"):  # build the shell without allocating or initializing a second set of weights
        hf_model = MegalodonForCausalLM(config)
    hf_model.model = model
    return hf_model.train(model.training)


def export_hf(model: Megalodon | str | Path, out_dir: str | Path,
              tokenizer: Tokenizer | str | Path | None = None) -> Path:
    """Write `model` (a Megalodon or our model directory) in the transformers layout, with its tokenizer and a
    model card (README.md; it includes the training summary when the model directory is a training run's).

    The tokenizer (ours, or a directory holding one) supplies bos/eos/pad ids for the config and is saved as
    a PreTrainedTokenizerFast, so that AutoTokenizer and AutoModelForCausalLM both load `out_dir`.
    """
    summary, train_config = {}, {}
    if isinstance(model, (str, Path)):
        summary, train_config = training_record(Path(model))
        model = Megalodon.from_pretrained(model)
    special_ids = {}
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{model.config.vocab_size}: they do not belong together")
        special_ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                       "pad_token_id": tokenizer.pad_id}
    out_dir = Path(out_dir)
    wrap(model, **special_ids).save_pretrained(out_dir)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, out_dir)
    card = model_card(model.config, model.num_parameters(), summary, train_config, has_tokenizer=tokenizer is not None)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def import_hf(hf_dir: str | Path, out_dir: str | Path | None = None) -> Megalodon:
    """The core Megalodon held by a transformers-layout directory; refuses missing, unknown or misshapen tensors.

    out_dir: also write it there as our model directory, with the tokenizer when `hf_dir` has one (so that
    `megalodon generate out_dir` runs).
    """
    hf_model, info = MegalodonForCausalLM.from_pretrained(str(hf_dir), output_loading_info=True)
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys",
                                                                "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        raise ValueError(f"{hf_dir} does not fit its own config: "
                         + "; ".join(f"{kind} {keys[:8]}" for kind, keys in problems.items()))
    model = hf_model.model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
        if any((Path(hf_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            load_tokenizer(hf_dir).save(out_dir)
    return model
