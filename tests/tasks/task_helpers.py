"""What the task tests share: a model small enough for float64, its training config, and split-marked haystacks."""

from megalodon.training.config import TrainConfig

SMALL = dict(model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=48, norm_num_groups=4, cema_ndim=4, chunk_size=8)

# Haystacks with a marker per split, so that a test can see which split a haystack came from.
TEXTS = {"train": [f"train line {i} of the play, with some words.\n" * 3 for i in range(50)],
         "test": [f"held-out line {i} of another play.\n" * 3 for i in range(50)]}


def config(**overrides) -> TrainConfig:
    values = dict(preset="tiny", model=SMALL, max_steps=2, warmup_steps=1, dtype="fp32", batch_size=4, lr=1e-2)
    return TrainConfig.from_dict({**values, **overrides})
