"""The one configuration object of the model: fields, presets and validation.

Field names follow the reference `ModelConf` so that configs and checkpoints translate one to one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

INIT_MODES = ("he", "bert", "gaussian", "xavier")

# Reference sizes (spec section 1), plus CPU-sized presets for tests and this project's own runs.
# Presets carry a vocab_size so that they instantiate as they are; override it with the tokenizer's.
PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=2, ffn_hidden_dim=128,
                 cema_ndim=8, chunk_size=32, norm_num_groups=8, vocab_size=256),
    "small": dict(num_layers=4, model_dim=256, z_dim=64, value_dim=512, num_heads=2, ffn_hidden_dim=512,
                  cema_ndim=16, chunk_size=256, norm_num_groups=16, swiglu=True, share_emb=True,
                  vocab_size=8192),
    "base": dict(num_layers=8, model_dim=384, z_dim=96, value_dim=768, num_heads=2, ffn_hidden_dim=1024,
                 cema_ndim=16, chunk_size=512, norm_num_groups=32, swiglu=True, share_emb=True,
                 vocab_size=8192),
    "mega200M": dict(num_layers=12, model_dim=1024, num_heads=1, z_dim=256, value_dim=2048, ffn_hidden_dim=2560,
                     chunk_size=2048, norm_num_groups=32, vocab_size=32000),
    "mega1.3B": dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096, ffn_hidden_dim=4864,
                     chunk_size=2048, norm_num_groups=64, vocab_size=32000),
    "mega1.3B_pg19": dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096,
                          ffn_hidden_dim=3584, chunk_size=2048, norm_num_groups=64, swiglu=True, scale_emb=True,
                          share_emb=True, vocab_size=32000),
    "mega7.1B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192, ffn_hidden_dim=11264,
                     chunk_size=2048, norm_num_groups=64, vocab_size=32000),
    "mega7.3B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192, ffn_hidden_dim=8192,
                     chunk_size=2048, norm_num_groups=64, swiglu=True, vocab_size=32000),
    # The paper's 7B run: mega7.3B with 4096-token chunks and the paper's rope base.
    "paper7B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192, ffn_hidden_dim=8192,
                    chunk_size=4096, norm_num_groups=64, swiglu=True, rope_base=100000.0, vocab_size=32000),
}


@dataclass
class MegalodonConfig:
    vocab_size: int  # token ids the embedding holds
    output_size: int = -1  # output logits (-1: vocab_size)
    num_layers: int = 8  # Megalodon blocks
    model_dim: int = 1024  # width of the residual stream
    z_dim: int = 256  # shared query/key representation Z
    value_dim: int = 2048  # attention values
    num_heads: int = 1  # attention heads (z_dim and value_dim are split among them)
    ffn_hidden_dim: int = 2048  # feed-forward hidden width
    cema_ndim: int = 16  # CEMA dimensions per model channel
    chunk_size: int = 2048  # attention runs within chunks of this many tokens
    norm_num_groups: int = 32  # TimestepNorm groups
    norm_eps: float = 1e-5  # epsilon of the norms
    norm_affine: bool = True  # learned scale and shift of the LayerNorm and RMSNorm
    rope_base: float | None = None  # rotary base (None: 10000)
    swiglu: bool = False  # SwiGLU feed-forward instead of the plain one
    rescale_nffn: bool = False  # a learned per-channel scale on the feed-forward output
    scale_emb: bool = False  # multiply embeddings by sqrt(model_dim)
    share_emb: bool = False  # tie the output projection to the embedding
    init_mode: str = "he"  # weight initialization: he, bert, gaussian or xavier
    dropout: float = 0.0  # dropout on each sublayer's output
    attention_dropout: float = 0.0  # dropout on attention weights
    hidden_dropout: float = 0.0  # dropout inside the attention and feed-forward paths

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return self.vocab_size if self.output_size == -1 else self.output_size

    @property
    def head_z_dim(self) -> int:
        return self.z_dim // self.num_heads

    @property
    def head_value_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def rope_theta(self) -> float:
        return 10000.0 if self.rope_base is None else float(self.rope_base)

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        check_field_types(self)
        for name in ("vocab_size", "num_layers", "model_dim", "z_dim", "value_dim", "num_heads",
                     "ffn_hidden_dim", "cema_ndim", "norm_num_groups"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"MegalodonConfig.{name} must be a positive integer, got {value!r}")
        if self.chunk_size < 1:
            raise ValueError(f"MegalodonConfig.chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        if not (self.output_size == -1 or self.output_size > 0):
            raise ValueError(f"MegalodonConfig.output_size must be -1 (= vocab_size) or positive, "
                             f"got {self.output_size!r}")
        if self.share_emb and self.num_outputs != self.vocab_size:
            raise ValueError("MegalodonConfig.share_emb=True needs output_size == vocab_size (or -1), "
                             f"got output_size={self.output_size} and vocab_size={self.vocab_size}")
        if self.z_dim % self.num_heads:
            raise ValueError(f"MegalodonConfig.z_dim ({self.z_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.value_dim % self.num_heads:
            raise ValueError(f"MegalodonConfig.value_dim ({self.value_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.head_z_dim % 2:
            raise ValueError(f"MegalodonConfig.z_dim / num_heads = {self.head_z_dim} must be even: rotary "
                             "embedding rotates feature pairs")
        if self.model_dim % self.norm_num_groups:
            raise ValueError(f"MegalodonConfig.model_dim ({self.model_dim}) must be divisible by "
                             f"norm_num_groups ({self.norm_num_groups})")
        for name in ("dropout", "attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"MegalodonConfig.{name} must be in [0, 1), got {value!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"MegalodonConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.rope_base is not None and not self.rope_base > 0:
            raise ValueError(f"MegalodonConfig.rope_base must be > 0 or None, got {self.rope_base!r}")
        if self.init_mode not in INIT_MODES:
            hint = " ('none' leaves weights uninitialized and is not offered)" if self.init_mode == "none" else ""
            raise ValueError(f"MegalodonConfig.init_mode must be one of {INIT_MODES}, got {self.init_mode!r}{hint}")

    # ---- construction and persistence ----------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "MegalodonConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError("unknown MegalodonConfig field(s): "
                             + ", ".join(_with_suggestion(k, cls.field_names()) for k in unknown))
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MegalodonConfig":
        if name not in PRESETS and ("/" in name or name.endswith(".json")):
            raise FileNotFoundError(f"no config file at {name!r} (and it is not a preset name: presets are "
                                    f"{sorted(PRESETS)})")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}"
                             + _suggestion(name, list(PRESETS)))
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_field_types(config) -> None:
    """Raise ValueError naming the first dataclass field whose value is not of its annotated type.

    Config files are where wrong types come from: TOML `swiglu = "no"` is a truthy string, YAML reads `1e-3` as
    text. A bool is not accepted as a number, an int is accepted as a float, and floats must be finite."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if optional and value is None:
            continue
        expected = _type_problem(value, kind)
        if expected:
            hint = ""
            if kind in ("int", "float") and isinstance(value, str) and _parses_as_number(value):
                hint = " (a quoted number? write it without quotes; YAML reads 1e-3 as text and 1.0e-3 as a number)"
            raise ValueError(f"{type(config).__name__}.{f.name} must be {expected}{' or None' if optional else ''}, "
                             f"got {value!r}{hint}")


def _type_problem(value, kind: str) -> str:
    """What `value` should have been for the annotation `kind`; empty when it is fine."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return "" if isinstance(value, bool) else "true or false"
    if kind == "int":
        return "" if number and isinstance(value, int) else "an integer"
    if kind == "float":
        return "" if number and math.isfinite(value) else "a finite number" if number else "a number"
    if kind == "str":
        return "" if isinstance(value, str) else "a string"
    if kind == "dict":
        return "" if isinstance(value, dict) else "a table of model-field overrides"
    raise TypeError(f"no type check for the annotation {kind!r}")


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _suggestion(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _with_suggestion(key: str, choices: list[str]) -> str:
    return repr(key) + _suggestion(key, choices)


def count_parameters(preset: str | MegalodonConfig, **overrides) -> int:
    """Parameters of the model a preset (or config) builds, computed from the shapes alone."""
    cfg = preset if isinstance(preset, MegalodonConfig) else MegalodonConfig.from_preset(preset, **overrides)
    d, n, z, v, f, g = (cfg.model_dim, cfg.cema_ndim, cfg.z_dim, cfg.value_dim, cfg.ffn_hidden_dim,
                        cfg.norm_num_groups)
    timenorm = 2 * d  # weight and bias; the prior is a buffer at prior_count 0
    cema = 4 * d * n + 2 * d  # alpha, delta, gamma (x2), theta, omega
    mega = (timenorm + cema + (d if cfg.norm_affine else 0)
            + (d * z + z) + 2 * (d * v + v) + (d * d + d) + v * d + 4 * z)
    ffn = 2 * d + (3 if cfg.swiglu else 2) * d * f + (d if cfg.rescale_nffn else 0)
    embed = cfg.vocab_size * d
    output = 0 if cfg.share_emb else cfg.num_outputs * d
    del g  # group count does not change the parameter count
    return embed + cfg.num_layers * (mega + ffn) + timenorm + output
