import sys
from pathlib import Path

import pytest

# The spawned ranks import the task modules by name, so this directory must be importable in them too
# (spawn hands sys.path to the children).
sys.path.insert(0, str(Path(__file__).parent))

from rank_pool import RankPool  # noqa: E402

WORLD = 4  # a 2 x 2 (dp, cp) mesh: P = 2 and 4, dp = 2, and both together from one spawn


def _pool_fixture(world: int):
    holder = {}

    def get() -> RankPool:
        if "pool" not in holder or not holder["pool"].alive:
            holder["pool"] = RankPool(world)
        return holder["pool"]

    yield get
    if "pool" in holder:
        holder["pool"].close()


@pytest.fixture(scope="session")
def ranks():
    """The session's pool of 4 gloo ranks, started on first use and replaced if a test broke it."""
    yield from _pool_fixture(WORLD)


@pytest.fixture(scope="session")
def two_ranks():
    """A pool of 2 gloo ranks (a world of 2: the trainer runs on the whole default group)."""
    yield from _pool_fixture(2)
