"""The streaming state (spec section 12): what a stream carries from one call to the next.

Its size depends on the config, the batch and the fill of the current chunk only, never on how many tokens
came before: that is what makes the context unlimited at constant memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from megalodon.config import MegalodonConfig
from megalodon.ops.timestep_norm import NormStats
from megalodon.validation import host_reads_free

STATE_FORMAT = "megalodon-state/1"


@dataclass
class LayerState:
    """One MEGA layer's part of the stream."""

    cema_h: Tensor  # B x D x N complex64: the EMA hidden state
    norm: NormStats  # TimestepNorm count (B,) int64, mean and var (B, G) fp32
    k_cache: Tensor  # B x c x H x dz: rotated keys of the current partial chunk (compute dtype)
    v_cache: Tensor  # B x c x H x dv: its values

    def map(self, fn) -> "LayerState":
        return LayerState(fn(self.cema_h), NormStats(*(fn(t) for t in self.norm)), fn(self.k_cache),
                          fn(self.v_cache))


@dataclass
class MegalodonState:
    """The whole model's stream state: one LayerState per layer, the final norm's statistics, and positions."""

    layers: list[LayerState]
    final_norm: NormStats
    position: Tensor  # B int64: tokens seen by each row; position % chunk_size is its in-chunk fill

    # ---- views -----------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @property
    def device(self) -> torch.device:
        return self.position.device

    def chunk_fill(self, chunk_size: int) -> Tensor:
        return self.position % chunk_size

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor view; complex tensors appear as (..., 2) real views."""
        out = {"position": self.position, "final_norm.count": self.final_norm.count,
               "final_norm.mean": self.final_norm.mean, "final_norm.var": self.final_norm.var}
        for i, layer in enumerate(self.layers):
            out[f"layers.{i}.cema_h"] = torch.view_as_real(layer.cema_h)
            for name, t in zip(NormStats._fields, layer.norm):
                out[f"layers.{i}.norm_{name}"] = t
            out[f"layers.{i}.k_cache"] = layer.k_cache
            out[f"layers.{i}.v_cache"] = layer.v_cache
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # ---- transformations -------------------------------------------------------------------------------------
    def map(self, fn) -> "MegalodonState":
        return MegalodonState([layer.map(fn) for layer in self.layers], NormStats(*(fn(t) for t in self.final_norm)),
                              fn(self.position))

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "MegalodonState":
        """Move to a device. Dtypes are kept (the CEMA state stays complex64 and the norm statistics float64
        whatever the model's dtype), so a dtype is refused rather than ignored."""
        if dtype is not None or isinstance(device, torch.dtype):
            raise TypeError("MegalodonState.to moves a state between devices only: its dtypes are fixed (complex64 "
                            "CEMA state, float64 norm statistics) whatever the model's dtype; pass a device")
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError):
            raise TypeError(f"MegalodonState.to needs a device such as 'cuda' or torch.device('cpu'), "
                            f"got {device!r}") from None
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def detach(self) -> "MegalodonState":
        return self.map(lambda t: t.detach())

    def clone(self) -> "MegalodonState":
        return self.map(lambda t: t.clone())

    def __len__(self) -> int:
        return self.batch_size

    def __iter__(self):
        return (self[i] for i in range(self.batch_size))

    def __getitem__(self, index) -> "MegalodonState":
        """Select rows along the batch: an int (keeps the batch dimension: a batch of one), a slice, a list of
        ints, or a 1-D integer or bool tensor. A selection outside the batch, or of no rows, is refused."""
        rows = self._rows(index)
        return self.map(lambda t: t[rows])

    def _rows(self, index) -> slice | Tensor:
        batch = self.batch_size
        if isinstance(index, (list, tuple)):
            if not all(isinstance(i, int) for i in index):
                raise TypeError(f"a list of state rows must hold ints, got {index!r}")
            index = torch.tensor(index, dtype=torch.bool if index and isinstance(index[0], bool) else torch.int64)
        if isinstance(index, bool):
            raise TypeError("a state row index must be an int, not a bool")
        if isinstance(index, int):
            if not -batch <= index < batch:
                raise ValueError(f"row {index} is out of range for a state of {batch} rows")
            index %= batch
            return slice(index, index + 1)
        if isinstance(index, slice):
            if not range(batch)[index]:
                raise ValueError(f"the slice {index} selects no rows of a state of {batch} rows")
            return index
        if not isinstance(index, Tensor) or index.dim() != 1:
            found = f"a tensor of {index.dim()} dims" if isinstance(index, Tensor) else type(index).__name__
            raise TypeError(f"state rows are selected by an int, a slice, a list of ints or a 1-D tensor, got {found}")
        if index.dtype == torch.bool:
            if index.shape[0] != batch:
                raise ValueError(f"a bool row mask must have {batch} entries (one per row), got {index.shape[0]}")
            index = index.nonzero().squeeze(1)
        elif index.is_floating_point() or index.is_complex():
            raise TypeError(f"state row indices must be integers, got {index.dtype}")
        if index.numel() == 0:
            raise ValueError("the selection holds no rows: a state needs at least one")
        if bool(((index < -batch) | (index >= batch)).any()):
            raise ValueError(f"row indices {index.tolist()} go beyond a state of {batch} rows")
        return index.to(self.device)

    @staticmethod
    def stack(states: list["MegalodonState"]) -> "MegalodonState":
        """Concatenate states along the batch. Rows may sit at different in-chunk positions: their caches are
        right-padded to the longest fill, which only single-token decode accepts."""
        if not states:
            raise ValueError("MegalodonState.stack needs at least one state")
        _check_stackable(states)
        longest = max(s.layers[0].k_cache.shape[1] if s.layers else 0 for s in states)

        def pad_to(t: Tensor) -> Tensor:
            return F.pad(t, (0, 0, 0, 0, 0, longest - t.shape[1]))

        layers = []
        for i in range(len(states[0].layers)):
            parts = [s.layers[i] for s in states]
            layers.append(LayerState(
                torch.cat([p.cema_h for p in parts]),
                NormStats(*(torch.cat(ts) for ts in zip(*(p.norm for p in parts)))),
                torch.cat([pad_to(p.k_cache) for p in parts]),
                torch.cat([pad_to(p.v_cache) for p in parts])))
        final = NormStats(*(torch.cat(ts) for ts in zip(*(s.final_norm for s in states))))
        return MegalodonState(layers, final, torch.cat([s.position for s in states]))

    # ---- checks ----------------------------------------------------------------------------------------------
    def check_compatible(self, config: MegalodonConfig, batch_size: int) -> None:
        """Raise ValueError unless this state was made by a model with `config`, for `batch_size` rows."""
        if self.batch_size != batch_size:
            raise ValueError(f"the state holds {self.batch_size} rows but the input has {batch_size}; "
                             "select rows with state[i] or start a new stream with state=None")
        if len(self.layers) != config.num_layers:
            raise ValueError(f"the state has {len(self.layers)} layers but the model has {config.num_layers}: "
                             "it comes from a different config")
        expected = {
            "cema_h": (batch_size, config.model_dim, config.cema_ndim),
            "norm mean": (batch_size, config.norm_num_groups),
            "k_cache heads": (config.num_heads, config.head_z_dim),
            "v_cache heads": (config.num_heads, config.head_value_dim),
        }
        for i, layer in enumerate(self.layers):
            found = {
                "cema_h": tuple(layer.cema_h.shape),
                "norm mean": tuple(layer.norm.mean.shape),
                "k_cache heads": tuple(layer.k_cache.shape[2:]),
                "v_cache heads": tuple(layer.v_cache.shape[2:]),
            }
            for name, shape in expected.items():
                if found[name] != shape:
                    raise ValueError(f"state layer {i}: {name} has shape {found[name]}, this model expects "
                                     f"{shape}: the state comes from a different config")
            if layer.k_cache.shape[1] >= config.chunk_size:
                raise ValueError(f"state layer {i}: the key cache holds {layer.k_cache.shape[1]} entries, "
                                 f"more than a partial chunk of chunk_size={config.chunk_size}")
        if self.final_norm.mean.shape != (batch_size, config.norm_num_groups):
            raise ValueError("the state's final norm statistics do not match this model's config")
        check_positions(self.position, batch_size)

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self, path: str | Path, config: MegalodonConfig | None = None,
             extra_tensors: dict[str, Tensor] | None = None, extra_metadata: dict[str, str] | None = None) -> None:
        """Write to safetensors, atomically; the config is recorded so that loading can refuse a mismatch.

        extra_tensors / extra_metadata ride along in the same file (e.g. a generation session's); their names
        must not clash with the state's own."""
        path = Path(path)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        meta = {"format": STATE_FORMAT, "num_layers": str(len(self.layers))}
        if config is not None:
            meta["config"] = json.dumps(config.to_dict(), sort_keys=True)
        for ours, extra, what in ((tensors, extra_tensors, "tensor"), (meta, extra_metadata, "metadata key")):
            clash = sorted(set(ours) & set(extra or {}))
            if clash:
                raise ValueError(f"extra {what}(s) {clash} would overwrite the state's own")
            ours.update({k: (v.detach().contiguous().cpu() if what == "tensor" else v)
                         for k, v in (extra or {}).items()})
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, config: MegalodonConfig | None = None, device="cpu") -> "MegalodonState":
        """Read a state written by `save`. With `config`, refuse a state that another model wrote."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no state file at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors state file ({err})") from None
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a Megalodon state (format {meta.get('format')!r}, "
                             f"expected {STATE_FORMAT!r})")
        if config is not None and "config" in meta:
            saved = json.loads(meta["config"])
            ours = config.to_dict()
            diffs = [k for k in ours if k not in ("dropout", "attention_dropout", "hidden_dropout")
                     and saved.get(k) != ours[k]]
            if diffs:
                raise ValueError(f"{path} was written by a model with a different config "
                                 f"({', '.join(f'{k}: {saved.get(k)!r} vs {ours[k]!r}' for k in diffs)})")
        try:
            layers = []
            for i in range(int(meta["num_layers"])):
                layers.append(LayerState(
                    torch.view_as_complex(tensors[f"layers.{i}.cema_h"].contiguous()),
                    NormStats(*(tensors[f"layers.{i}.norm_{n}"] for n in NormStats._fields)),
                    tensors[f"layers.{i}.k_cache"], tensors[f"layers.{i}.v_cache"]))
            final = NormStats(*(tensors[f"final_norm.{n}"] for n in NormStats._fields))
            position = tensors["position"]
        except KeyError as err:
            raise ValueError(f"{path} is missing the state tensor {err.args[0]!r}") from None
        if position.dtype != torch.int64 or position.dim() != 1 or bool((position < 0).any()):
            raise ValueError(f"{path}: the state's position must be non-negative int64 token counts, one per row")
        return cls(layers, final, position)



def check_positions(position: Tensor, batch_size: int) -> None:
    """Positions are (B,) int64 counts of tokens seen, never negative. The sign is checked where it costs nothing,
    on the CPU and outside a compiled graph (where it would break the graph): a check of a GPU tensor would make
    every forward wait for the GPU. GPU states are checked where they enter decoding (DecodeState.from_state)
    and when loaded from a file."""
    if not isinstance(position, Tensor) or position.dtype != torch.int64 or position.shape != (batch_size,):
        found = f"{position.dtype} {tuple(position.shape)}" if isinstance(position, Tensor) else type(position).__name__
        raise ValueError(f"state.position must be an int64 tensor of shape ({batch_size},), got {found}")
    if host_reads_free(position) and bool((position < 0).any()):
        raise ValueError(f"state.position must count tokens seen (>= 0), got {position.tolist()}")


def _check_stackable(states: list[MegalodonState]) -> None:
    """States stack along the batch only if they come from one model: same layers, per-row shapes, dtypes and
    device (the caches may differ in length: rows sit at different fills)."""
    first = states[0].tensors()
    for i, state in enumerate(states):
        if not isinstance(state, MegalodonState):
            raise TypeError(f"MegalodonState.stack takes MegalodonStates; item {i} is a {type(state).__name__}")
        if len(state.layers) != len(states[0].layers):
            raise ValueError(f"state {i} has {len(state.layers)} layers but state 0 has {len(states[0].layers)}: "
                             "states from different models cannot be stacked")
        for name, tensor in state.tensors().items():
            ref = first[name]
            per_row = 2 if name.endswith(("k_cache", "v_cache")) else 1  # caches: batch and fill may differ
            if (tensor.shape[per_row:] != ref.shape[per_row:] or tensor.dtype != ref.dtype
                    or tensor.device != ref.device):
                raise ValueError(f"state {i}'s {name} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}, "
                                 f"state 0's is {ref.dtype} {tuple(ref.shape)} on {ref.device}: states from "
                                 "different models, dtypes or devices cannot be stacked")
