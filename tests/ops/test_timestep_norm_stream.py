"""TimestepNorm over long streams and split sequences: the decode step's precision at any position, the in-place
step, autocast, and the segment statistics / merge / incoming-state normalization of chunk parallelism."""

import torch

from megalodon.layers.timestep_norm import TimestepNorm
from megalodon.ops.timestep_norm import (STATS_DTYPE, NormStats, merge_statistics, segment_statistics,
                                         timestep_norm_blocked, timestep_norm_step, timestep_norm_step_)

G, D = 2, 4


def exact_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of all tokens' group values, two-pass in float64: (B, G) each."""
    grouped = x.double().unflatten(-1, (G, -1)).transpose(1, 2).flatten(2)  # B x G x (L * D/G)
    mean = grouped.mean(-1)
    return mean, (grouped - mean[..., None]).square().mean(-1)


def decode_error(x: torch.Tensor, prefill: int) -> float:
    """Relative error of the running variance after prefilling `prefill` tokens and decoding the rest one by one."""
    empty = NormStats(torch.zeros(1, dtype=torch.int64), torch.zeros(1, G, dtype=STATS_DTYPE),
                      torch.ones(1, G, dtype=STATS_DTYPE))
    w, b = torch.zeros(D), torch.zeros(D)
    _, state = timestep_norm_blocked(x[:, :prefill], empty, w, b, 1e-5, block_size=4096)
    with torch.no_grad():
        for t in range(prefill, x.shape[1]):
            _, state = timestep_norm_step(x[:, t:t + 1], state, w, b, 1e-5)
    assert int(state.count) == x.shape[1]
    _, var = exact_statistics(x)
    return float(((state.var - var).abs() / var).max())


def test_decode_step_error_does_not_grow_with_position():
    """Issue 12: a fp32 running mean/var drifts once (mu - m) / n falls below its resolution (1.6e-3 relative at
    200K tokens). Decoding 2,000 tokens at position 250K must be as accurate as at position 1K."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 252_000, D, generator=g) * 0.5 + 3.0
    late = decode_error(x, 250_000)
    early = decode_error(x[:, :3_000], 1_000)
    assert late < 1e-6 and early < 1e-6, (early, late)


def test_in_place_step_equals_the_functional_step():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, D, generator=g)
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    state = NormStats(torch.tensor([0, 4, 9]), torch.randn(3, G, generator=g, dtype=STATS_DTYPE),
                      torch.rand(3, G, generator=g, dtype=STATS_DTYPE) + 0.5)
    buffers = NormStats(*(t.clone() for t in state))
    addresses = [t.data_ptr() for t in buffers]
    for t in range(5):
        y, state = timestep_norm_step(x[:, t:t + 1], state, w, b, 1e-5)
        y_in_place = timestep_norm_step_(x[:, t:t + 1], buffers, w, b, 1e-5)
        torch.testing.assert_close(y_in_place, y, rtol=0, atol=0)
    assert [t.data_ptr() for t in buffers] == addresses
    for got, want in zip(buffers, state):
        assert torch.equal(got, want)


def test_statistics_stay_float64_and_untouched_by_bf16_autocast():
    torch.manual_seed(2)
    norm = TimestepNorm(D, G, 1e-5)
    x = torch.randn(2, 9, D) * 3 + 1
    y, state = norm(x, block_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto, state_auto = norm(x, block_size=4)
        step_auto, step_state = norm(x[:, :1], state_auto)
    step, step_state_ref = norm(x[:, :1], state)
    assert state.mean.dtype == state.var.dtype == step_state.var.dtype == torch.float64
    assert norm.initial_state(2).var.dtype == torch.float64
    assert torch.equal(y_auto, y) and torch.equal(step_auto, step)
    assert all(torch.equal(a, b) for a, b in zip(state_auto, state))
    assert all(torch.equal(a, b) for a, b in zip(step_state, step_state_ref))


def test_segment_statistics_merge_into_the_whole_sequence():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 23, D, generator=g, dtype=torch.float64) * 2 + 5
    pad = torch.zeros(2, 23, dtype=torch.bool)
    pad[1, 15:] = True
    initial = NormStats(torch.tensor([3, 0]), torch.randn(2, G, generator=g, dtype=torch.float64),
                        torch.rand(2, G, generator=g, dtype=torch.float64) + 0.5)
    w, b = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    _, whole = timestep_norm_blocked(x, initial, w, b, 1e-5, pad_mask=pad)
    parts = [segment_statistics(x[:, s:e], G, pad[:, s:e]) for s, e in ((0, 7), (7, 16), (16, 23))]
    merged = initial
    for part in parts:
        merged = merge_statistics(merged, part)
    assert torch.equal(merged.count, whole.count) and merged.count.tolist() == [26, 15]
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.var, whole.var, rtol=1e-12, atol=1e-12)


def test_chunk_parallel_emulation_equals_one_call_with_gradients():
    """Spec section 14: local statistics per segment from an empty state, a prefix of Chan merges for each
    segment's incoming state, then each segment normalized from it; outputs and gradients equal one call's."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 24, D, generator=g, dtype=torch.float64) + 1).requires_grad_()
    prior = NormStats(torch.tensor([0, 0]), torch.zeros(2, G, dtype=torch.float64),
                      torch.ones(2, G, dtype=torch.float64))
    w = torch.randn(D, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    y_one, _ = timestep_norm_blocked(x, prior, w, b, 1e-5, block_size=8)

    segments = x.split(8, dim=1)
    local = [segment_statistics(s, G) for s in segments]
    incoming, outputs = prior, []
    for seg, stats in zip(segments, local):
        y, _ = timestep_norm_blocked(seg, incoming, w, b, 1e-5, block_size=8)
        outputs.append(y)
        incoming = merge_statistics(incoming, stats)
    y_par = torch.cat(outputs, 1)
    torch.testing.assert_close(y_par, y_one, rtol=1e-10, atol=1e-10)
    probe = torch.randn(y_one.shape, generator=g, dtype=torch.float64)
    (grad_one,) = torch.autograd.grad((y_one * probe).sum(), x)
    (grad_par,) = torch.autograd.grad((y_par * probe).sum(), x)
    torch.testing.assert_close(grad_par, grad_one, rtol=1e-9, atol=1e-9)


def test_gradcheck_segment_statistics_and_merge():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, D, generator=g, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(2, G, generator=g, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(2, G, generator=g, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(x, mean, var):
        merged = merge_statistics(NormStats(torch.tensor([2, 0]), mean, var), segment_statistics(x, G))
        return merged.mean, merged.var

    assert torch.autograd.gradcheck(fn, (x, mean, var))


def test_layer_step_in_place_equals_its_forward():
    torch.manual_seed(6)
    norm = TimestepNorm(D, G, 1e-5)
    x = torch.randn(2, 3, D)
    _, state = norm(x[:, :2], block_size=4)
    y, expected = norm(x[:, 2:], state)
    with torch.no_grad():
        y_in_place = norm.step_(x[:, 2:], state)
    torch.testing.assert_close(y_in_place, y, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(state, expected))
