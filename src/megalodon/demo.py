"""A short end-to-end run of a tiny random model: forward, backward, and streaming generation."""

from __future__ import annotations

import time

import torch

from megalodon import Megalodon, MegalodonConfig


def main() -> None:
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    config = MegalodonConfig.from_preset("tiny")
    model = Megalodon(config)
    print(f"tiny Megalodon: {model.num_parameters():,} parameters, chunk {config.chunk_size}")

    ids = torch.randint(0, config.vocab_size, (4, 4 * config.chunk_size + 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(20):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            print(f"step {step:2d}  loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        logits, state = model(ids[:1, :50], return_state=True)
        token = logits[:, -1:].argmax(-1)
        start, generated = time.perf_counter(), []
        for _ in range(200):
            logits, state = model(token, state=state, return_state=True)
            token = logits[:, -1:].argmax(-1)
            generated.append(token.item())
        elapsed = time.perf_counter() - start
    print(f"streamed 200 tokens at {200 / elapsed:.0f} tokens/s; state {state.nbytes} bytes at position "
          f"{int(state.position)}")


if __name__ == "__main__":
    main()
