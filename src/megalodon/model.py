"""The Megalodon language model: embedding, a stack of blocks, final TimestepNorm and output projection.

Attribute names follow the reference (`embed`, `rope.freqs`, `layers.i.mega`, `layers.i.nffn`,
`output.final_norm`, `output.output`), so its state_dict is the reference keyspace up to the tied embedding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon.config import MegalodonConfig
from megalodon.decode_state import DecodeState
from megalodon.layers.block import MegalodonBlock
from megalodon.layers.linears import plain
from megalodon.layers.norms import compute_dtype
from megalodon.layers.timestep_norm import TimestepNorm
from megalodon.ops.attention import rope_frequencies, rotary_angles
from megalodon.ops.loss import IGNORE_INDEX, summed_cross_entropy
from megalodon.ops.static_kv import slot_step, slot_table
from megalodon.state import MegalodonState
from megalodon.validation import check_targets, check_token_ids, require


class StepConstants(NamedTuple):
    """What a decode step derives from the parameters and the config alone (Megalodon.decode_constants)."""

    layers: list  # per layer: MovingAverageGatedAttention.decode_constants() and the FFN norm's affine()
    rotations: Tensor  # (2, chunk, dz): cos and signed sin (rotary_angles) of every in-chunk position
    visible: Tensor  # slot_table(chunk): the slots a row writing slot s attends to


class Rotary(nn.Module):
    """Holds the rotary frequencies, shared by every layer (reference key `rope.freqs`)."""

    def __init__(self, config: MegalodonConfig):
        super().__init__()
        self.register_buffer("freqs", rope_frequencies(config.head_z_dim, config.rope_theta).float())


class OutputHead(nn.Module):
    def __init__(self, config: MegalodonConfig):
        super().__init__()
        self.final_norm = TimestepNorm(config.model_dim, config.norm_num_groups, config.norm_eps)
        self.output = nn.Linear(config.model_dim, config.num_outputs, bias=False)


class Megalodon(nn.Module):
    def __init__(self, config: MegalodonConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.model_dim)
        self.rope = Rotary(config)
        self.layers = nn.ModuleList(MegalodonBlock(config, i) for i in range(config.num_layers))
        self.output = OutputHead(config)
        self.reset_parameters()
        if config.share_emb:
            self.output.output.weight = self.embed.weight

    # ---- initialization --------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialization (spec section 2), drawn from torch's global generator."""
        dim = self.config.model_dim
        for weight in (self.embed.weight, self.output.output.weight):
            std = 1.0 / math.sqrt(dim)
            nn.init.trunc_normal_(weight, 0.0, std, -3.0 * std, 3.0 * std)
        for block in self.layers:
            mega, nffn = block.mega, block.nffn
            mega.cema.reset_parameters()
            linears = [mega.wz, mega.wv, mega.wr, mega.wh1, mega.wh2, nffn.fc1, nffn.fc2, nffn.fc3]
            for linear in filter(None, linears):
                init_linear(linear.weight, self.config.init_mode)
                if linear.bias is not None:
                    linear.bias.zero_()

    # ---- the forward pass ------------------------------------------------------------------------------------
    def forward(
        self, input_ids: Tensor, state: MegalodonState | None = None, return_state: bool = False,
        doc_start: Tensor | None = None, logits_to_keep: int = 0, targets: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, MegalodonState]:
        """Logits (B, L, output_size) in fp32, and the state after the last token when return_state.

        state: the stream so far (from an earlier call), or None to start fresh.
        doc_start: (B, L) bool, True where a new document begins: the CEMA, the norm statistics and attention
        restart there, so nothing leaks across documents. Documents must start on the chunk grid.
        logits_to_keep: project only the last N positions (0 = all); prefill needs just the last one.
        targets: (B, L) int64, the token after each position (-100 where none): return the summed cross-entropy
        (an fp32 scalar) in place of the logits, without ever holding all of them (ops/loss.py).
        """
        batch, length = self._check_inputs(input_ids, state, logits_to_keep)
        if targets is not None:
            check_targets(targets, batch, length, self.config.num_outputs, IGNORE_INDEX)
            if logits_to_keep:
                raise ValueError("targets and logits_to_keep exclude each other: the loss needs every position")
        block_reset = None if doc_start is None else self._block_reset(doc_start, state, batch, length)
        position = None if state is None else state.position

        x = self.embed(input_ids)
        if self.config.scale_emb:
            x = x * math.sqrt(self.config.model_dim)
        x = F.dropout(x, self.config.dropout, self.training)

        rotation = self.rotation(state, length, x.dtype)
        new_layers = []
        for i, block in enumerate(self.layers):
            layer_state = None if state is None else state.layers[i]
            x, layer_state = block(x, rotation, layer_state, position, block_reset, return_state)
            new_layers.append(layer_state)

        xn, final_stats = self.output.final_norm(x, None if state is None else state.final_norm,
                                                 self.config.chunk_size, block_reset)
        head = self.output.output
        if targets is not None and plain(head):
            hidden = xn.to(compute_dtype(x)).flatten(0, 1)  # as autocast casts the head's input
            out = summed_cross_entropy(hidden, head.weight, targets.flatten())
        else:
            logits = head((xn[:, -logits_to_keep:] if logits_to_keep else xn).to(x.dtype))
            out = logits.to(torch.promote_types(logits.dtype, torch.float32))
            if targets is not None:  # a wrapped head (layers/linears.py): its own logits, then the loss
                out = F.cross_entropy(out.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                      reduction="sum")
        if not return_state:
            return out
        start = torch.zeros(batch, dtype=torch.int64, device=x.device) if position is None else position
        return out, MegalodonState(new_layers, final_stats, start + length)

    def rotation(self, state: MegalodonState | None, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The rotary tables of a call's tokens (rotary_angles of their in-chunk positions, in fp32 or better
        than dtype), which every layer applies alike: a single token takes each row's own position, a longer call
        starts where the key caches' shared fill ends (_check_inputs made sure there is one)."""
        chunk, dtype = self.config.chunk_size, torch.promote_types(dtype, torch.float32)
        if state is not None and length == 1:
            positions = (state.position % chunk)[:, None]  # B x 1
        else:
            start = state.layers[0].k_cache.shape[1] if state is not None and state.layers else 0
            positions = (torch.arange(length, device=self.rope.freqs.device) + start) % chunk
        return rotary_angles(positions, self.rope.freqs, dtype)

    @torch.no_grad()
    def decode_constants(self) -> StepConstants:
        """What decode_step_ derives from the parameters and the config alone: compute it once per generation
        and pass it to every step."""
        chunk, device = self.config.chunk_size, self.rope.freqs.device
        cos, sin = rotary_angles(torch.arange(chunk, device=device), self.rope.freqs,
                                 torch.promote_types(self.embed.weight.dtype, torch.float32))
        return StepConstants([(block.mega.decode_constants(), block.nffn.norm.affine()) for block in self.layers],
                             torch.stack([cos[0, :, 0], sin[0, :, 0]]), slot_table(chunk, device))

    @torch.no_grad()
    def decode_step_(self, input_ids: Tensor, state: DecodeState, constants: StepConstants | None = None) -> Tensor:
        """One token per row, input_ids (B,) int64, advancing the static `state` in place; returns the logits
        (B, output_size) in fp32 (or better). Equal to forward() on (B, 1) ids with the MegalodonState that
        `state` holds, rows at any in-chunk positions, but with no host sync and no data-dependent shape, so a
        CUDA graph or torch.compile can hold it (megalodon.inference.decoding.StaticDecoder does).
        constants: decode_constants() (None computes them in the step, which costs many kernels).

        The ids' values are not checked here (on a GPU that needs a sync): StaticDecoder checks what it can."""
        if input_ids.shape != (state.batch_size,):
            raise ValueError(f"decode_step_ takes one token id per row, shape ({state.batch_size},), "
                             f"got {tuple(input_ids.shape)}")
        chunk = self.config.chunk_size
        constants = self.decode_constants() if constants is None else constants
        fill = state.position % chunk  # B: each row's slot in its chunk
        # The same in every layer: where each row writes and what it sees, and its rotary tables (B, 1, 1, dz).
        step = slot_step(fill, chunk, table=constants.visible)
        rotation = constants.rotations[:, fill][:, :, None, None].unbind(0)
        x = self.embed(input_ids).unsqueeze(1)  # B x 1 x D
        if self.config.scale_emb:
            x = x * math.sqrt(self.config.model_dim)
        for block, layer_state, (mega, ffn_norm) in zip(self.layers, state.layers, constants.layers, strict=True):
            y = block.mega.decode_step_(x, rotation, step, layer_state, mega)
            # the two-hop residual, as in MegalodonBlock; x is this step's own, so the FFN adds into it in place
            x = block.nffn.decode_step_(y, x, ffn_norm)
        _, xn = self.output.final_norm.step_(x, state.final_norm, x.dtype)
        logits = self.output.output(xn)[:, 0]
        state.position.add_(1)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def compile_blocks(self, **options) -> "Megalodon":
        """torch.compile each block and the final norm in place (`options` go to torch.compile, e.g.
        fullgraph=True or mode="max-autotune"); returns the model. What the trainer's --compile does.

        Per-block compilation keeps graphs small (blocks of one model share their compiled code), and leaves the
        embedding, the checks at the boundary and the loop over layers eager. It composes with activation
        checkpointing (apply it first) and FSDP applied per block. Training and streaming calls both work; a call
        of a new length or state layout recompiles (mark lengths dynamic with torch._dynamo.mark_dynamic to
        avoid that)."""
        for block in self.layers:
            block.compile(**options)
        self.output.final_norm.compile(**options)
        return self

    def _check_inputs(self, input_ids: Tensor, state: MegalodonState | None, logits_to_keep: int) -> tuple[int, int]:
        """Shapes and types eagerly; values without a host sync (validation.require)."""
        batch, length = check_token_ids(input_ids, self.config.vocab_size)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
            raise TypeError(f"logits_to_keep must be an int (0 = every position), got {logits_to_keep!r}")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position, N = the last N), "
                             f"got {logits_to_keep}")
        if state is not None:
            if not isinstance(state, MegalodonState):
                raise TypeError(f"state must be a MegalodonState, got {type(state).__name__}")
            state.check_compatible(self.config, batch)
            if length > 1 and state.layers:
                # The key caches hold the current partial chunk, as long as the fill of its fullest row.
                fill = state.layers[0].k_cache.shape[1]
                require((state.position % self.config.chunk_size == fill).all(),
                        "the rows of this state sit at different positions inside their chunks; only "
                        "single-token calls can advance them together (prefill each row separately, then "
                        "decode one token at a time)")
        return batch, length

    def _block_reset(self, doc_start: Tensor, state: MegalodonState | None, batch: int, length: int) -> Tensor:
        """doc_start (B, L) -> one reset flag per chunk (B, ceil(L / C)), checked without a host sync."""
        chunk = self.config.chunk_size
        if not isinstance(doc_start, Tensor):
            raise TypeError(f"doc_start must be a torch.Tensor of bools of shape {(batch, length)}, "
                            f"got {type(doc_start).__name__}")
        if doc_start.shape != (batch, length) or doc_start.dtype != torch.bool:
            raise ValueError(f"doc_start must be a bool tensor of shape {(batch, length)}, "
                             f"got {doc_start.dtype} {tuple(doc_start.shape)}")
        off_grid = doc_start.clone()
        off_grid[:, ::chunk] = False

        def where() -> str:
            row, pos = off_grid.nonzero()[0].tolist()
            return (f"doc_start is True at row {row}, position {pos}, which is not a multiple of "
                    f"chunk_size={chunk}: documents must start on the chunk grid (pad the previous one)")

        require(~off_grid.any(), f"doc_start is True off the chunk grid (positions that are not multiples of "
                                 f"chunk_size={chunk}): documents must start on the chunk grid", where)
        if state is not None:
            require(~(doc_start.any() & (state.position % chunk != 0).any()),
                    "doc_start needs a call that begins on a chunk boundary (state.position % chunk_size == 0); "
                    "this state sits mid-chunk")
        return doc_start[:, ::chunk].contiguous()  # once here: every layer's kernels read it contiguous

    # ---- conveniences ----------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path) -> None:
        from megalodon.checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location="cpu") -> "Megalodon":
        from megalodon.checkpoint import load_pretrained

        model = load_pretrained(directory, map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}; "
                             "use megalodon.checkpoint.load_pretrained for either architecture")
        return model


def init_linear(weight: Tensor, mode: str) -> None:
    """The reference init modes for the MEGA and FFN linears."""
    if mode == "he":
        nn.init.kaiming_normal_(weight, a=math.sqrt(5.0))  # std = 1 / sqrt(3 * fan_in)
    elif mode == "bert":
        nn.init.normal_(weight, 0.0, 0.02)
    elif mode == "gaussian":
        nn.init.trunc_normal_(weight, 0.0, 1.0, -3.0, 3.0)
    elif mode == "xavier":
        nn.init.xavier_uniform_(weight)
    else:
        raise ValueError(f"unknown init_mode {mode!r}")
