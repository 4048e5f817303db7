"""Removing the names of DeepSpeed's per-rank shared-memory all-reduce buffers, so that CPU jobs do not leak RAM.

On the CPU accelerator DeepSpeed builds ``deepspeed_shm_comm_op``. When every rank of the job is on this host
(``LOCAL_SIZE == WORLD_SIZE``, as the ``deepspeed`` launcher sets it), ``deepspeed.init_distributed`` makes it map one
buffer per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (69 MB each on
DeepSpeed 0.19.8), and every rank maps every other rank's buffer before ``init_distributed`` returns. Nothing ever
unlinks them (``shared_close`` is never called), so each such job leaves ``WORLD_SIZE x 69 MB`` in ``/dev/shm``,
which is RAM, until the machine reboots; a few dozen CPU jobs fill a 24 GB machine, and Ray's memory monitor then
kills the workers of later jobs. Once all ranks have mapped all buffers, unlinking the names is safe: the mappings
of the running job stay valid, and the memory is freed when its last process exits.
"""
from __future__ import annotations

import os

import torch.distributed as dist

SHARED_MEMORY_DIR = "/dev/shm"
BUFFER_PREFIX = "deepspeed_allreduce_buffer"  # SHM_BUFFER_NAME in DeepSpeed's csrc/cpu/comm/shm.cpp


def cpu_allreduce_buffer_path(rank: int) -> str:
    """The ``/dev/shm`` path of rank ``rank``'s DeepSpeed CPU all-reduce buffer in this job (named from the user id
    and this process's ``MASTER_ADDR`` and ``MASTER_PORT``, as DeepSpeed's ``shm_initialize`` names it)."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHARED_MEMORY_DIR, f"{BUFFER_PREFIX}_{os.getuid()}_{address}_{port}_{rank}")


def unlink_cpu_allreduce_buffer() -> bool:
    """Call on every rank right after ``deepspeed.init_distributed``: waits until every rank has mapped the
    buffers (a barrier on the default group), then removes this rank's buffer name. Does nothing (returns False)
    when torch.distributed is not initialized or DeepSpeed did not create this rank's buffer (GPU jobs, ranks on
    several hosts, DeepSpeed without its shared-memory op); True when it removed the name."""
    if not dist.is_initialized():
        return False
    path = cpu_allreduce_buffer_path(dist.get_rank())
    created = os.path.exists(path)
    dist.barrier()
    if created:
        os.unlink(path)
    return created
