"""A pool of processes joined in one gloo process group, reused by every distributed test.

The processes fork from a forkserver that has imported torch once (spawning 4 fresh interpreters costs 10+ s of
imports on 2 cores), and they live for the whole test session: `RankPool.run(fn, *args)` runs a module-level
function on every rank at once and returns the per-rank results. Task functions live in importable modules.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

TASK_TIMEOUT_S = 120  # a deadlock fails the test instead of hanging CI
COLLECTIVE_TIMEOUT_S = 60


def _serve(rank: int, world: int, store_path: str, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
            results.put((rank, False, traceback.format_exc()))
    # Every result has been received by now. A normal exit spends ~3 s tearing down the process groups; the
    # sockets close with the process anyway.
    os._exit(0)


class RankPool:
    def __init__(self, world: int):
        ctx = mp.get_context("forkserver")  # not "fork": the test process may hold threads and locks
        ctx.set_forkserver_preload(["torch", "megalodon.parallel", "dist_tasks", "train_tasks"])
        self.world = world
        self._dir = tempfile.TemporaryDirectory()
        store = os.path.join(self._dir.name, "store")
        self._tasks = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, args=(r, world, store, self._tasks[r], self._results),
                                   daemon=True) for r in range(world)]
        for p in self._procs:
            p.start()
        self.alive = True

    def run(self, fn, *args) -> list:
        """fn(*args) on every rank; returns [result of rank 0, ..., rank world-1]."""
        for q in self._tasks:
            q.put((fn, args))
        outcomes = {}
        try:
            for _ in range(self.world):
                rank, ok, value = self._results.get(timeout=TASK_TIMEOUT_S)
                outcomes[rank] = (ok, value)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"{fn.__name__} did not finish on ranks "
                               f"{sorted(set(range(self.world)) - set(outcomes))} within {TASK_TIMEOUT_S} s")
        failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
        if failures:
            self.close()  # a failed collective can leave the group unusable: the next test starts a new pool
            raise RuntimeError(f"{fn.__name__} failed\n" + "\n".join(failures))
        return [outcomes[r][1] for r in range(self.world)]

    def close(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        self._dir.cleanup()
