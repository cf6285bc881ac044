"""The trainer's configuration: one dataclass, loaded from a TOML/YAML/JSON file plus `--key value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megalodon import configs as builtin_configs
from megalodon.config import MegalodonConfig, check_field_types

ARCHS = ("megalodon", "llama")
SCHEDULES = ("linear", "cosine")
DTYPES = ("auto", "bf16", "fp16", "fp32")
CUDA_GRAPHS = ("auto", "true", "false")
BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
PARALLEL_KINDS = ("fsdp", "ddp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class TrainConfig:
    # what to train
    arch: str = "megalodon"  # "megalodon", or "llama": the baseline matched to the preset
    preset: str = "small"  # a Megalodon preset; the baseline is matched to it by parameter count
    model: dict = field(default_factory=dict)  # overrides of model fields ([model] table, or --model.field)
    init_from: str = ""  # a Megalodon model directory to start from (fine-tuning): its weights, fields and tokenizer
    # data
    data: str = "shakespeare"  # a built-in corpus (shakespeare, bible, austen) or comma-separated paths
    val_data: str = ""  # validation documents of your own (a built-in corpus or paths); then all of data trains
    data_dir: str = "data"  # cache of corpora, tokenizers and token stores
    tokenizer: str = "bpe"  # "bpe" (trained on the train split), "byte", or a path to a tokenizer.json/dir
    vocab_size: int = 8192  # for a trained BPE
    # batches
    seq_len: int = 1024  # tokens per training window (a multiple of the chunk size)
    batch_size: int = 8  # rows per optimizer step, split into grad_accum micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step
    stateful: bool = True  # carry the recurrent state across consecutive windows of a document (Megalodon)
    # length of the run: max_steps, or a wall-clock budget that fixes max_steps after a few timed steps
    max_steps: int = 0  # wins over time_budget_min when both are set
    time_budget_min: float = 0.0  # wall-clock minutes of the training loop; fixes max_steps at the end of warmup
    # optimization (reference defaults)
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup from lr * warmup_init_ratio to lr
    warmup_init_ratio: float = 1e-4  # warmup starts at lr * this
    min_lr_ratio: float = 0.01  # the schedule ends at lr * this
    schedule: str = "linear"  # decay after warmup: "linear" or "cosine"
    beta1: float = 0.9  # AdamW
    beta2: float = 0.98  # AdamW
    eps: float = 1e-8  # AdamW
    weight_decay: float = 0.1  # AdamW, none on norms, biases and CEMA parameters
    grad_clip: float = 1.0  # gradient norm clipping (0: off)
    # execution
    dtype: str = "auto"  # "auto" (bf16 autocast where fast, else fp32), "bf16", "fp16" (loss-scaled; V100, T4), "fp32"
    compile: bool = False  # torch.compile each block (model.compile_blocks)
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" replays each block from CUDA graphs
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, more time
    cuda_graphs: str = "auto"  # steps from CUDA graphs: auto (on one CUDA GPU; eager if capture fails), true, false
    threads: int = 0  # torch threads; 0 keeps torch's default
    seed: int = 0  # initialization, data order, document split and samples
    # several processes (docs/distributed.md): torchrun -m megalodon train, or --nproc N
    nproc: int = 0  # processes to start on this machine, as torchrun --standalone would (0: this one only)
    parallel: str = "fsdp"  # on several ranks: "fsdp" (FSDP2, weights sharded) or "ddp" (weights replicated)
    chunk_parallel: int = 1  # ranks that split every sequence between them (the mesh is dp x cp)
    collective_timeout_min: float = 30.0  # a rank left waiting this long for the others ends the run
    # logging, evaluation, checkpoints
    log_every: int = 10  # steps between metrics.jsonl records (and progress lines in a log)
    eval_every: int = 200  # steps between validation runs (0: only at the end)
    eval_batch_size: int = 4  # rows of validation windows
    eval_tokens: int = 0  # validation tokens per evaluation (0: the whole split; bits/byte then scale its bytes)
    sample_every: int = 0  # steps between printed samples (0: only at the end)
    sample_prompt: str = "ROMEO:"  # what the samples continue
    sample_tokens: int = 120  # tokens per sample
    checkpoint_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # the newest ones kept
    tensorboard: bool = False  # also log to run_dir/tensorboard (needs: pip install tensorboard)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Types, then ranges, then the model the preset and overrides describe: all before any work starts."""
        if isinstance(self.cuda_graphs, str) and self.cuda_graphs.lower() in BOOL_WORDS:  # as the boolean options
            self.cuda_graphs = BOOL_WORDS[self.cuda_graphs.lower()]
        if isinstance(self.cuda_graphs, bool):  # as configs and run directories written before "auto" hold it
            self.cuda_graphs = "true" if self.cuda_graphs else "false"
        check_field_types(self)
        if self.init_from:
            self._take_initial_model()
        checks = [
            (self.arch in ARCHS, "arch", f"one of {ARCHS}"),
            (self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}"),
            (self.dtype in DTYPES, "dtype", f"one of {DTYPES}"),
            (self.seq_len >= 1, "seq_len", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.grad_accum >= 1, "grad_accum", ">= 1"),
            (self.batch_size % self.grad_accum == 0, "batch_size", f"divisible by grad_accum ({self.grad_accum})"),
            (self.max_steps >= 0, "max_steps", ">= 0"),
            (self.time_budget_min >= 0, "time_budget_min", ">= 0"),
            (self.max_steps > 0 or self.time_budget_min > 0, "max_steps",
             "> 0, or set time_budget_min (--max_steps N or --time_budget_min MINUTES; --config demo is the "
             "README's five-minute run)"),
            (self.lr > 0, "lr", "> 0"),
            (self.warmup_steps >= 0, "warmup_steps", ">= 0"),
            (0 < self.warmup_init_ratio <= 1, "warmup_init_ratio", "in (0, 1]"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]"),
            (0 <= self.beta1 < 1, "beta1", "in [0, 1)"),
            (0 <= self.beta2 < 1, "beta2", "in [0, 1)"),
            (self.eps > 0, "eps", "> 0"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.grad_clip >= 0, "grad_clip", ">= 0 (0 disables clipping)"),
            (self.vocab_size >= 259, "vocab_size", ">= 259 (256 bytes + specials)"),
            (self.threads >= 0, "threads", ">= 0 (0 keeps torch's default)"),
            (self.seed >= 0, "seed", ">= 0"),
            (self.nproc >= 0, "nproc", ">= 0 (0: this process only)"),
            (self.parallel in PARALLEL_KINDS, "parallel", f"one of {PARALLEL_KINDS}"),
            (self.compile_mode in COMPILE_MODES, "compile_mode", f"one of {COMPILE_MODES}"),
            (self.compile or self.compile_mode == "default", "compile_mode",
             '"default" unless compile is true (--compile true --compile_mode reduce-overhead)'),
            (self.cuda_graphs in CUDA_GRAPHS, "cuda_graphs", f"one of {CUDA_GRAPHS}"),
            (self.cuda_graphs != "true" or self.compile_mode in ("default", "max-autotune-no-cudagraphs"),
             "cuda_graphs",
             f"false with compile_mode {self.compile_mode!r}, whose blocks replay CUDA graphs of their own: use one "
             "or the other (--compile true --cuda_graphs true graphs the compiled blocks' whole step)"),
            (not (self.cuda_graphs == "true" and self.activation_checkpointing), "cuda_graphs",
             "false with activation_checkpointing: its recomputation saves and restores the random state on the "
             "host, which a captured step cannot replay; at the lengths that need it the GPU's work per kernel "
             "hides the host anyway"),
            (not (self.cuda_graphs == "true" and self.nproc > 1), "cuda_graphs",
             "false with several processes (nproc): a captured step cannot hold their collectives"),
            (self.chunk_parallel >= 1, "chunk_parallel", ">= 1"),
            (self.collective_timeout_min > 0, "collective_timeout_min", "> 0"),
            (self.log_every >= 1, "log_every", ">= 1"),
            (self.eval_every >= 0, "eval_every", ">= 0 (0: only at the end)"),
            (self.eval_batch_size >= 1, "eval_batch_size", ">= 1"),
            (self.eval_tokens >= 0, "eval_tokens", ">= 0 (0: the whole split)"),
            (self.sample_every >= 0, "sample_every", ">= 0 (0: only at the end)"),
            (self.sample_prompt != "", "sample_prompt", "non-empty: the sample continues it"),
            (self.sample_tokens >= 1, "sample_tokens", ">= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every", ">= 0 (0: only at the end)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")
        MegalodonConfig.from_preset(self.preset, **self.model)  # unknown presets and bad model fields, now

    def _take_initial_model(self) -> None:
        """init_from: the directory's model fields (under --model's), and its tokenizer, written into this config,
        so that train_config.json records the architecture trained and a resumed run rebuilds it."""
        from megalodon.checkpoint import CONFIG_NAME, read_config

        directory = Path(self.init_from)
        if not directory.is_dir():
            raise FileNotFoundError(f"init_from {self.init_from!r}: no such model directory; give one that a run "
                                    "saved (RUN_DIR/model) or `megalodon convert` wrote")
        config, _ = read_config(directory / CONFIG_NAME)
        if not isinstance(config, MegalodonConfig):
            raise ValueError(f"init_from {self.init_from!r} holds a {type(config).__name__.removesuffix('Config')} "
                             "model: init_from starts Megalodon runs only")
        given = {"arch": (self.arch, "megalodon"), "preset": (self.preset, "small"),
                 "tokenizer": (self.tokenizer, "bpe", self.init_from)}
        for name, (value, *allowed) in given.items():
            if value not in allowed:
                raise ValueError(f"TrainConfig.{name} cannot be set with init_from ({value!r} given): the model, "
                                 f"its fields and its tokenizer are {self.init_from}'s; change a field with "
                                 "--model.FIELD (dropout, chunk_size: any that keeps the weights' shapes)")
        self.model = {**dataclasses.asdict(config), **self.model}
        self.tokenizer = self.init_from

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ValueError("unknown training option(s): " + ", ".join(_suggest(k, names) for k in unknown))
        return cls(**values)


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def read_config_file(path: str | Path) -> dict:
    """A TOML, YAML or JSON file of options, or a built-in config's name ("demo"); model overrides go in a
    [model] table."""
    path = builtin_configs.resolve(path)
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"{path}: unknown config format {path.suffix!r}; use .toml, .yaml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text ({err})") from None
    if path.suffix == ".toml":
        import tomllib

        values = _parse(path, "TOML", tomllib.loads, text, tomllib.TOMLDecodeError)
    elif path.suffix == ".json":
        values = _parse(path, "JSON", json.loads, text, json.JSONDecodeError)
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path} is YAML but PyYAML is not installed: pip install pyyaml, or use TOML") from None
        values = _parse(path, "YAML", yaml.safe_load, text, yaml.YAMLError)
        values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of options (key = value), found a "
                         f"{type(values).__name__}")
    return values


def _parse(path: Path, kind: str, parse, text: str, error: type[Exception]):
    try:
        return parse(text)
    except error as err:
        raise ValueError(f"config file {path} is not valid {kind}: {err}") from None


def parse_value(raw: str, like: Any, key: str) -> Any:
    """A command-line string as a value of the type of `like` (the field's default); `key` names it in errors."""
    if like is None:  # an optional number such as rope_base
        return None if raw.lower() == "none" else parse_value(raw, 0.0, key)
    if isinstance(like, bool):
        if raw.lower() in BOOL_WORDS:
            return BOOL_WORDS[raw.lower()]
        raise ValueError(f"--{key} expects true or false, got {raw!r}")
    for kind in (int, float):
        if isinstance(like, kind):
            try:
                return kind(raw)
            except ValueError:
                raise ValueError(f"--{key} expects a number ({kind.__name__}), got {raw!r}") from None
    return raw


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `--key value`, `--key=value` and `--model.field value` pairs on top of `values`."""
    defaults = TrainConfig(max_steps=1).to_dict()
    names = list(defaults)
    model_names = MegalodonConfig.field_names()
    model = values.get("model", {})
    values = {**values, "model": dict(model) if isinstance(model, dict) else model}  # a non-table is refused later
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            raise ValueError(f"expected an option like --key value, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides) or overrides[i + 1].startswith("--"):
                raise ValueError(f"--{key} needs a value")
            raw = overrides[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if key.startswith("model."):
            if not isinstance(values["model"], dict):
                raise ValueError(f"--{key} needs the config's model to be a table, got {values['model']!r}")
            name = key[len("model."):]
            if name not in model_names:
                raise ValueError(f"unknown model field {_suggest(name, model_names)}")
            like = dataclasses.fields(MegalodonConfig)[model_names.index(name)].default
            values["model"][name] = parse_value(raw, like if like is not dataclasses.MISSING else 0, key)
        elif key in names:
            values[key] = parse_value(raw, defaults[key], key)
        else:
            raise ValueError(f"unknown training option {_suggest(key, names + ['model.<field>'])}")
    return values
