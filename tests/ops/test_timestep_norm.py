"""TimestepNorm's vectorized path against explicit per-token merges, in float64."""

import pytest
import torch

from megalodon.ops.timestep_norm import (NormStats, chan_merge, timestep_norm, timestep_norm_blocked,
                                         timestep_norm_sequential, timestep_norm_step)

G, D = 3, 12


def stats(batch, count=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return NormStats(torch.full((batch,), count, dtype=torch.int64),
                     torch.randn(batch, G, generator=g, dtype=torch.float64),
                     torch.rand(batch, G, generator=g, dtype=torch.float64) + 0.5)


def affine():
    return torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)


@pytest.mark.parametrize("length", [1, 5, 16, 23])
@pytest.mark.parametrize("count", [0, 4])
@pytest.mark.parametrize("block", [None, 4])
def test_blocked_matches_sequential(length, count, block):
    torch.manual_seed(0)
    x = torch.randn(2, length, D, dtype=torch.float64) * 3 + 1
    initial, (w, b) = stats(2, count), affine()
    y_ref, s_ref = timestep_norm_sequential(x, initial, w, b, 1e-5)
    y, s = timestep_norm_blocked(x, initial, w, b, 1e-5, block_size=block)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(s.count, s_ref.count)
    torch.testing.assert_close(s.mean, s_ref.mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.var, s_ref.var, rtol=1e-9, atol=1e-9)


def test_first_token_uses_its_own_statistics_at_prior_count_zero():
    x = torch.randn(1, 1, D, dtype=torch.float64)
    y, _ = timestep_norm_blocked(x, stats(1, 0), torch.zeros(D, dtype=torch.float64),
                                 torch.zeros(D, dtype=torch.float64), 0.0)
    grouped = x.view(1, 1, G, -1)
    expected = (grouped - grouped.mean(-1, keepdim=True)) / grouped.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(y, expected.view(1, 1, D))


def test_padding_mask():
    torch.manual_seed(1)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, :3] = True
    pad[1, 5:] = True
    initial, (w, b) = stats(2, 2), affine()
    y_ref, s_ref = timestep_norm_sequential(x, initial, w, b, 1e-5, pad_mask=pad)
    y, s = timestep_norm_blocked(x, initial, w, b, 1e-5, block_size=4, pad_mask=pad)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    assert (y[pad] == 0).all()
    assert s.count.tolist() == [2 + 6, 2 + 5]
    torch.testing.assert_close(s.var, s_ref.var, rtol=1e-9, atol=1e-9)


def test_two_calls_equal_one():
    torch.manual_seed(2)
    x = torch.randn(2, 17, D, dtype=torch.float64)
    initial, (w, b) = stats(2, 0), affine()
    y, s = timestep_norm_blocked(x, initial, w, b, 1e-5, block_size=4)
    y1, s1 = timestep_norm_blocked(x[:, :6], initial, w, b, 1e-5, block_size=4)
    y2, s2 = timestep_norm_blocked(x[:, 6:], s1, w, b, 1e-5, block_size=4)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    assert torch.equal(s2.count, s.count)
    torch.testing.assert_close(s2.var, s.var, rtol=1e-10, atol=1e-10)


def test_block_reset_restarts_at_prior():
    torch.manual_seed(3)
    x = torch.randn(1, 12, D, dtype=torch.float64)
    prior, (w, b) = stats(1, 0, seed=5), affine()
    reset = torch.tensor([[False, False, True]])
    y, _ = timestep_norm_blocked(x, stats(1, 3), w, b, 1e-5, block_size=4, block_reset=reset, prior=prior)
    y_tail, _ = timestep_norm_sequential(x[:, 8:], prior, w, b, 1e-5)
    torch.testing.assert_close(y[:, 8:], y_tail, rtol=1e-10, atol=1e-10)


def test_chan_merge_equals_pooled_statistics():
    a, b = torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64) + 3
    merged = chan_merge(torch.tensor(7.0), a.mean(), a.var(unbiased=False),
                        torch.tensor(5.0), b.mean(), b.var(unbiased=False))
    both = torch.cat([a, b])
    torch.testing.assert_close(merged[1], both.mean())
    torch.testing.assert_close(merged[2], both.var(unbiased=False))


def test_fp32_long_stream_with_large_mean_stays_accurate():
    torch.manual_seed(4)
    x = torch.randn(1, 4096, D, dtype=torch.float64) + 300.0
    initial, (w, b) = stats(1, 0), affine()
    y64, s64 = timestep_norm_blocked(x, initial, w, b, 1e-5, block_size=256)
    y32, s32 = timestep_norm_blocked(x.float(), NormStats(initial.count, initial.mean.float(), initial.var.float()),
                                     w.float(), b.float(), 1e-5, block_size=256)
    torch.testing.assert_close(s32.var.double(), s64.var, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(y32[:, -100:].double(), y64[:, -100:], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("length, counts", [(5, [3, 1]), (1, [0, 1, 4])], ids=["block-scan", "one-token-step"])
def test_gradcheck_with_an_incoming_state(length, counts):
    """Into x, the incoming statistics and the affine weights: through the block scan (blocks of 2), and through
    the single-token step's own backward (the normalization's formula, which a one-token training call or a stream
    trained token by token runs; count 0: the token's own moments alone)."""
    torch.manual_seed(5)
    x = torch.randn(len(counts), length, 6, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(len(counts), 2, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(len(counts), 2, dtype=torch.float64) + 0.5).requires_grad_(True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def fn(x, mean, var, w, b):
        state = NormStats(torch.tensor(counts), mean, var)
        if length == 1:
            y, s = timestep_norm_step(x, state, w, b, 1e-5)
        else:
            y, s = timestep_norm_blocked(x, state, w, b, 1e-5, block_size=2)
        return y, s.mean, s.var

    assert torch.autograd.gradcheck(fn, (x, mean, var, w, b))


def test_step_matches_blocked():
    torch.manual_seed(6)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    initial, (w, b) = stats(2, 3), affine()
    y_ref, s_ref = timestep_norm_blocked(x, initial, w, b, 1e-5)
    state, outs = initial, []
    for t in range(7):
        y, state = timestep_norm_step(x[:, t:t + 1], state, w, b, 1e-5)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), y_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(state.count, s_ref.count)
    torch.testing.assert_close(state.var, s_ref.var, rtol=1e-10, atol=1e-10)


def test_gradcheck_with_resets_prior_and_padding():
    """The fused backward passes of the moments and the normalization, and autograd through the block scan,
    including the prior's gradient (count > 0) where a block restarts."""
    torch.manual_seed(7)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(2, 2, dtype=torch.float64) + 0.5).requires_grad_(True)
    prior_mean = torch.randn(2, dtype=torch.float64, requires_grad=True)
    prior_var = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_(True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    reset = torch.tensor([[False, True, False, False], [True, False, True, False]])
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5] = True

    def fn(x, mean, var, prior_mean, prior_var, w, b):
        y, s = timestep_norm_blocked(x, NormStats(torch.tensor([3, 1]), mean, var), w, b, 1e-5, block_size=2,
                                     block_reset=reset, prior=NormStats(torch.tensor(2), prior_mean, prior_var),
                                     pad_mask=pad)
        return y, s.mean, s.var

    assert torch.autograd.gradcheck(fn, (x, mean, var, prior_mean, prior_var, w, b))


def test_empty_sequence_returns_the_incoming_state():
    initial = stats(2, 5)
    y, s = timestep_norm(torch.zeros(2, 0, D, dtype=torch.float64), initial, *affine(), 1e-5, block_size=4)
    assert y.shape == (2, 0, D) and s.count.tolist() == [5, 5]
    assert torch.equal(s.mean, initial.mean) and torch.equal(s.var, initial.var)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.zeros(2, 3, 10)), "not a multiple of the 3 groups"),
    (dict(x=torch.zeros(2, 3)), "shape \\(B, L, D\\)"),
    (dict(block_reset=torch.zeros(2, 2, dtype=torch.bool)), "block_reset must be a bool tensor of shape \\(2, 3\\)"),
    (dict(block_size=0), "block_size must be >= 1"),
])
def test_bad_input_is_named(kwargs, match):
    args = dict(x=torch.zeros(2, 9, D), block_size=4, block_reset=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        timestep_norm(args["x"], stats(2), *affine(), 1e-5, args["block_size"], args["block_reset"])
