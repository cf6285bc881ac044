"""The next-token loss from the last hidden states, without holding the (tokens, vocabulary) logits.

A language model's loss is cross_entropy(hidden W^T, targets). Done as written, the logits of every token are a
(tokens, vocabulary) tensor, held in the compute dtype and again in fp32 for the softmax, with its gradient of the
same size in backward: at mega200M (32,000 words) and 4K tokens that is about a third of a training step's
activation memory, and at 32K tokens about 8 GB. `summed_cross_entropy` takes the tokens a block at a time and
computes each block's gradients as soon as its logits exist, so that only one block's logits are ever held; what
backward keeps is the gradient of the hidden states (tokens x model_dim) and of W (vocabulary x model_dim).

The arithmetic is the logits path's own: the block's logits in the hidden states' dtype (bf16 under autocast, as
the head's GEMM gives them), their log-softmax in fp32, the gradient (softmax - one-hot, the log-softmax
exponentiated in place) cast back to that dtype for the two GEMMs, W's gradient summed over the blocks in fp32:
about a third fewer bytes moved than the logits path's casts and passes over whole logits. torch's own
F.linear_cross_entropy (torch >= 2.13) does the same chunking but returns a bf16 input's loss in bf16, which
rounds a sum over thousands of tokens to 3 significant digits; and the GPU's torch (2.11) has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # the target of a position with no next token: torch's cross_entropy skips it too
LOGITS_PER_BLOCK = 1 << 25  # elements of one block's fp32 logits: 128 MB, 1,024 tokens at 32,000 words


def summed_cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """sum over tokens whose target is not ignore_index of -log softmax(hidden weight^T)[target], fp32: the
    logits path (hidden (N, D) in the compute dtype, weight (V, D) cast to it, targets (N,) int64; outside
    autocast). fp32, or float64 for float64 hidden states."""
    logits = F.linear(hidden, weight.to(hidden.dtype))
    return F.cross_entropy(logits.to(_softmax_dtype(hidden)), targets, ignore_index=ignore_index, reduction="sum")


def _softmax_dtype(hidden: Tensor) -> torch.dtype:
    """fp32 for the softmax, or better (a float64 model keeps float64)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def summed_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         block_tokens: int | None = None) -> Tensor:
    """summed_cross_entropy_reference's loss and gradients (for hidden and the weight, kept in its own dtype:
    fp32 master weights get fp32 gradients), holding one block of `block_tokens` tokens' logits at a time
    (default: LOGITS_PER_BLOCK elements). hidden comes in the head's compute dtype (bf16 under autocast: the
    caller casts it, as autocast would cast the head's input); autocast is off inside."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1:] != hidden.shape[1:]:
        raise ValueError(f"summed_cross_entropy: hidden (N, D), weight (V, D) and targets (N,), got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    if block_tokens is not None and (isinstance(block_tokens, bool) or not isinstance(block_tokens, int)
                                     or block_tokens < 1):
        raise ValueError(f"summed_cross_entropy: block_tokens must be a whole number >= 1 (None: the default), "
                         f"got {block_tokens!r}")
    block = block_tokens or max(1, LOGITS_PER_BLOCK // weight.shape[0])
    gradients = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)  # none in evaluation
    with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs run in hidden's dtype, as given
        return _BlockedCrossEntropy.apply(hidden, weight, targets, ignore_index, block, gradients)


class _BlockedCrossEntropy(torch.autograd.Function):
    """Forward computes each block's loss and, where gradients are wanted, its gradients at once; backward scales
    them by the loss's incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, block: int,
                gradients: bool) -> Tensor:
        want_hidden, want_weight = (want and gradients for want in ctx.needs_input_grad[:2])
        ctx.weight_dtype = weight.dtype
        cast = weight.to(hidden.dtype)
        total = torch.zeros((), dtype=_softmax_dtype(hidden), device=hidden.device)
        d_hidden = torch.empty_like(hidden) if want_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=total.dtype, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], block):
            rows = slice(start, start + block)
            h, t = hidden[rows], targets[rows]
            # the logits in hidden's dtype, as the head's GEMM gives them; their log-softmax upcast as it reads them
            log_probs = torch.log_softmax(F.linear(h, cast), dim=-1, dtype=total.dtype)
            valid = t != ignore_index
            picked = torch.where(valid, t, 0)[:, None]
            total -= torch.where(valid, log_probs.gather(1, picked)[:, 0], 0.0).sum()
            if not (want_hidden or want_weight):
                continue
            grad = log_probs.exp_()  # softmax - one-hot: the gradient of the token's loss for its logits
            grad.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad.dtype))
            grad = grad.to(hidden.dtype).masked_fill_(~valid[:, None], 0)
            if want_hidden:
                torch.mm(grad, cast, out=d_hidden[rows])
            if want_weight:
                d_weight += torch.mm(grad.t(), h)
        ctx.save_for_backward(d_hidden, d_weight)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph: a derivative of these gradients would silently lack the softmax's
            raise RuntimeError("summed_cross_entropy has no second derivative (its gradients are computed in the "
                               "forward pass, without a graph): for create_graph=True, call the model without "
                               "targets= and take F.cross_entropy of its logits")
        d_hidden, d_weight = ctx.saved_tensors
        # the 0-dim fp32 scale multiplies bf16 d_hidden unrounded (cast to bf16 first, 1/n_labels would be off by
        # up to 0.4%, for the whole body's gradient)
        return (None if d_hidden is None else d_hidden * grad,
                None if d_weight is None else (d_weight * grad).to(ctx.weight_dtype), None, None, None, None)
