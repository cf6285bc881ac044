"""Prefill in blocks: progress reports, and generate()'s hooks for a progress bar and a clean stop."""

import torch

from megalodon.inference import SamplingConfig, generate, prefill_session
from megalodon.inference.stream import final_logits_and_state


def test_prefill_reports_progress_after_each_block(model):
    ids = torch.randint(0, 259, (40,), generator=torch.Generator().manual_seed(0))
    calls = []
    with torch.no_grad():
        logits, _ = final_logits_and_state(model, ids, block_tokens=16, progress=lambda *a: calls.append(a))
        plain, _ = final_logits_and_state(model, ids)
    assert calls == [(16, 40), (32, 40), (40, 40)]
    torch.testing.assert_close(logits, plain)


def test_generate_reports_each_prompts_prefill(model, tokenizer):
    calls = []
    generate(model, tokenizer, ["a" * 20, "b" * 5], SamplingConfig(max_new_tokens=1), prefill_chunks=1,
             prefill_progress=lambda *a: calls.append(a))
    assert calls == [(0, 8, 20), (0, 16, 20), (0, 20, 20), (1, 5, 5)]
    session_calls = []
    prefill_session(model, tokenizer, "c" * 9, progress=lambda *a: session_calls.append(a))
    assert session_calls == [(9, 9)]


def test_should_stop_ends_every_row_cleanly(model, tokenizer):
    steps = []

    def stop_after_three() -> bool:
        steps.append(1)
        return len(steps) > 3

    sampling = SamplingConfig(temperature=0, max_new_tokens=50, stop_on_eos=False)
    stopped = generate(model, tokenizer, ["one", "two!"], sampling, should_stop=stop_after_three)
    assert [r.finish_reason for r in stopped] == ["interrupted", "interrupted"]
    for prompt, result in zip(["one", "two!"], stopped):
        assert len(result.ids) == 4  # three steps, then one more token
        full, = generate(model, tokenizer, [prompt], SamplingConfig(temperature=0, max_new_tokens=4,
                                                                     stop_on_eos=False))
        assert result.ids == full.ids and result.session.position == len(prompt) + 4


def test_prefill_blocks_are_longer_on_a_gpu():
    """A prefill (last logits only) on CUDA takes calls of about 32K tokens, where 4K-token calls are bound by the
    host's launches; on the CPU, in evaluation (every logit kept) and with a truncation window, blocks stay as
    they were. Whole chunks always."""
    from megalodon.inference.stream import PREFILL_TOKENS_CUDA, default_block_tokens

    assert default_block_tokens(2048) == 4096 and default_block_tokens(2048, prefill_device="cpu") == 4096
    assert default_block_tokens(2048, prefill_device="cuda") == PREFILL_TOKENS_CUDA == 32768
    assert default_block_tokens(3000, prefill_device=torch.device("cuda", 1)) == 33000  # 11 whole chunks
    assert default_block_tokens(65536, prefill_device="cuda") == 65536  # at least one chunk
    assert default_block_tokens(2048, truncating=True, prefill_device="cuda") == 2 * 2048
