"""The chunk-parallel combine in one process: P segments summarized apart, combined, corrected, must equal the whole
sequence run by the sequential float64 references (outputs, final states and gradients), document resets and
incoming states included."""

import pytest
import torch

from megalodon.ops.cema import cema, cema_coefficients, cema_sequential, cema_state_bias
from megalodon.ops.timestep_norm import NormStats, timestep_norm_blocked, timestep_norm_sequential
from megalodon.parallel.combine import cema_incoming, cema_summary, norm_incoming, norm_summary

CHUNK = 4
DTYPE = torch.float64


def random_resets(batch: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Resets on the chunk grid: row 0 none, the others random, with one at every segment boundary in row 1."""
    gen = torch.Generator().manual_seed(seed)
    resets = torch.rand(batch, num_blocks, generator=gen) < 0.25
    resets[0] = False
    return resets


def documents(row_resets: torch.Tensor) -> list[tuple[int, int]]:
    """(first block, end block) of each document in one row; the first starts at block 0."""
    starts = [0] + [c for c in range(1, len(row_resets)) if row_resets[c]]
    return list(zip(starts, starts[1:] + [len(row_resets)]))


def norm_reference(x, initial, prior, weight, bias, eps, resets):
    """Each document run alone, token by token: the first from `initial`, the others from the prior."""
    rows, finals = [], []
    for b in range(x.shape[0]):
        pieces, state = [], NormStats(*(t[b:b + 1] for t in initial))
        for i, (start, end) in enumerate(documents(resets[b])):
            if i > 0 or resets[b, 0]:
                state = NormStats(prior.count.view(1), prior.mean[None], prior.var[None])
            y, state = timestep_norm_sequential(x[b:b + 1, start * CHUNK:end * CHUNK], state, weight, bias, eps)
            pieces.append(y)
        rows.append(torch.cat(pieces, 1))
        finals.append(state)
    return torch.cat(rows), NormStats(*(torch.cat(t) for t in zip(*finals)))


def cema_reference(u, coeffs, omega, h0, resets):
    rows, finals = [], []
    for b in range(u.shape[0]):
        pieces, h = [], h0[b:b + 1]
        for i, (start, end) in enumerate(documents(resets[b])):
            if i > 0 or resets[b, 0]:
                h = torch.zeros_like(h)
            y, h = cema_sequential(u[b:b + 1, :, start * CHUNK:end * CHUNK], coeffs, omega, h)
            pieces.append(y)
        rows.append(torch.cat(pieces, -1))
        finals.append(h)
    return torch.cat(rows), torch.cat(finals)


def projection_loss(tensors, seed: int):
    """A fixed random linear function of several tensors, to compare gradients through all of them at once."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in tensors)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_norm_combine_equals_whole_sequence(ranks):
    torch.manual_seed(ranks)
    batch, blocks_per_rank, dim, groups = 3, 2, 12, 3
    length = ranks * blocks_per_rank * CHUNK
    x = (torch.randn(batch, length, dim, dtype=DTYPE) * 2 + 0.5).requires_grad_()
    weight, bias = torch.randn(dim, dtype=DTYPE) * 0.1, torch.randn(dim, dtype=DTYPE) * 0.1
    prior = NormStats(torch.tensor(2), torch.randn(groups, dtype=DTYPE), torch.rand(groups, dtype=DTYPE) + 0.5)
    initial = NormStats(torch.tensor([0, 5, 9]), torch.randn(batch, groups, dtype=DTYPE).requires_grad_(),
                        (torch.rand(batch, groups, dtype=DTYPE) + 0.5).requires_grad_())
    resets = random_resets(batch, ranks * blocks_per_rank, seed=ranks)
    resets[1, ::blocks_per_rank] = True  # a document starting exactly at every segment boundary

    # What every rank does: summarize its segment, gather (here: stack), take its incoming state and the final one.
    segments, seg_resets = x.chunk(ranks, dim=1), resets.chunk(ranks, dim=1)
    summaries = torch.stack([norm_summary(s, groups, CHUNK, r) for s, r in zip(segments, seg_resets)])
    outputs = []
    for r, segment in enumerate(segments):
        incoming, final = (NormStats(*t) for t in zip(*norm_incoming(initial, prior, summaries, (r, ranks))))
        outputs.append(timestep_norm_blocked(segment, incoming, weight, bias, 1e-5, CHUNK, seg_resets[r], prior)[0])
    outputs = torch.cat(outputs, 1)

    expected, expected_final = norm_reference(x, initial, prior, weight, bias, 1e-5, resets)
    torch.testing.assert_close(outputs, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(final.count, expected_final.count)
    torch.testing.assert_close(final.mean, expected_final.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final.var, expected_final.var, rtol=1e-10, atol=1e-10)

    inputs = (x, initial.mean, initial.var)
    grads = torch.autograd.grad(projection_loss([outputs, final.mean, final.var], 0), inputs)
    expected_grads = torch.autograd.grad(projection_loss([expected, expected_final.mean, expected_final.var], 0),
                                         inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_cema_combine_equals_whole_sequence(ranks):
    torch.manual_seed(10 + ranks)
    batch, blocks_per_rank, dim, ndim = 3, 3, 6, 4
    length = ranks * blocks_per_rank * CHUNK - (CHUNK - 1)  # the last segment ends mid-chunk
    params = [torch.randn(dim, ndim, 1, dtype=DTYPE), torch.randn(dim, ndim, 1, dtype=DTYPE),
              torch.randn(dim, 1, 1, dtype=DTYPE), torch.randn(dim, ndim, 2, dtype=DTYPE)]
    params = [p.requires_grad_() for p in params]
    coeffs = cema_coefficients(*params)
    omega = torch.randn(dim, dtype=DTYPE)
    u = torch.randn(batch, dim, length, dtype=DTYPE, requires_grad=True)
    h0 = torch.randn(batch, dim, ndim, dtype=torch.complex128, requires_grad=True)
    resets = random_resets(batch, -(-length // CHUNK), seed=ranks)
    resets[1, ::blocks_per_rank] = True

    bounds = [min(r * blocks_per_rank * CHUNK, length) for r in range(ranks + 1)]
    segments = [u[..., a:b].transpose(1, 2) for a, b in zip(bounds, bounds[1:])]  # B x S x D, as the layer has it
    seg_resets = resets.split(blocks_per_rank, dim=1)
    local = [cema(s, coeffs, omega, None, CHUNK, r) for s, r in zip(segments, seg_resets)]
    summaries = torch.stack([cema_summary(torch.view_as_complex(h), s.shape[1], r)
                             for (_, h), s, r in zip(local, segments, seg_resets)])
    outputs = []
    for r, (y, _) in enumerate(local):
        incoming, final = cema_incoming(h0, coeffs, summaries, (r, ranks))
        outputs.append(y + cema_state_bias(torch.view_as_real(incoming), coeffs, segments[r].shape[1], CHUNK,
                                           seg_resets[r]))
    outputs = torch.cat(outputs, 1).transpose(1, 2)

    expected, expected_final = cema_reference(u, coeffs, omega, h0, resets)
    torch.testing.assert_close(outputs, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10)

    inputs = (u, h0, *params)
    grads = torch.autograd.grad(projection_loss([outputs, torch.view_as_real(final)], 1), inputs, retain_graph=True)
    expected_grads = torch.autograd.grad(projection_loss([expected, torch.view_as_real(expected_final)], 1), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)
