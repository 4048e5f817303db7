"""Run a function on ``P`` local CPU processes joined in a gloo process group (tests, ``nsa-dist train --cp``).

The ranks meet through a file store in the run's temporary directory (``file://`` rendezvous): no TCP port is
searched for, so concurrent runs on one machine cannot race for one."""
from __future__ import annotations

import datetime
import os
import tempfile
import time
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable, world_size: int, run_dir: str, args: tuple, threads: int,
           collective_timeout_s: float) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(run_dir, "rendezvous"), rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(run_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_local_group(fn: Callable, world_size: int, *args, threads: int = 1, timeout: Optional[float] = None,
                    collective_timeout_s: float = 600) -> List[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each call in a fresh process of one gloo
    group (the default group there; ``fn`` and ``args`` must be picklable, ``fn`` importable by name).

    Args:
        threads: torch intra-op threads per process.
        timeout: seconds for the whole run; past it the processes are killed and ``TimeoutError`` raised.
        collective_timeout_s: a collective waiting longer (a rank died or diverged) raises in every rank.
    Returns:
        the ranks' return values. A rank's exception fails the call with its traceback
        (``torch.multiprocessing.ProcessRaisedException``).
    """
    with tempfile.TemporaryDirectory() as run_dir:
        context = mp.start_processes(_entry, args=(fn, world_size, run_dir, args, threads, collective_timeout_s),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if deadline is not None and time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish within {timeout} s")
        return [torch.load(os.path.join(run_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
