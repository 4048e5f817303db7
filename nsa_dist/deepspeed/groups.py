"""Data-, context- and Ulysses-parallel process groups of a training job, and the ``mpu`` object DeepSpeed reads
them from."""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


class ContextDataParallelGroups:
    """Ranks ``0 .. W-1`` as ``DP x CP x U`` (row-major, Ulysses innermost): rank ``r`` has Ulysses index
    ``r % U``, context-parallel index ``(r // U) % CP`` and data-parallel index ``r // (CP * U)``.

    - Ulysses groups: ``U`` consecutive ranks (the all-to-all over heads is the heaviest exchange, so it stays
      within a node where ``U`` divides the GPUs per node). They split one context-parallel shard into ``U``
      contiguous pieces.
    - Context-parallel groups: the ``CP`` ranks ``U`` apart that hold the same heads of the ``CP`` shards.
    - Sequence groups: the ``CP * U`` consecutive ranks sharing every sequence; data-parallel groups: ranks with the
      same ``r % (CP * U)`` (DP excludes the sequence ranks).

    E.g. 8 ranks with ``CP = 2``, ``U = 2``: Ulysses groups {0,1} {2,3} {4,5} {6,7}, CP groups {0,2} {1,3} {4,6}
    {5,7}, sequence groups {0,1,2,3} {4,5,6,7}, DP groups {0,4} {1,5} {2,6} {3,7}. Every rank must construct it
    (it creates process groups).

    As DeepSpeed's ``mpu`` (``deepspeed.initialize(mpu=...)``) it reports no model parallelism, the sequence group
    (``CP * U`` ranks) as DeepSpeed's sequence-parallel group and all ``DP * CP * U`` ranks (every replica of the
    parameters) as its sequence-data-parallel group: DeepSpeed partitions the ZeRO optimizer state over that group
    and reduces gradients over it, summing over the sequence ranks and averaging over DP, so each rank's loss is its
    share of its data-parallel batch's mean. DeepSpeed reads two different things from the data-parallel names: the
    *size and rank* for batch arithmetic (``train_batch_size = micro * grad_accum * DP``) and sampling, which
    exclude the sequence ranks, and the *group* ZeRO-3 partitions the parameters over, which must be the same
    replicas as the optimizer's (DeepSpeed's own sequence-parallel state leaves it to the whole world for that
    reason).

    The groups come from a ``(dp, cp, ulysses)`` :func:`~torch.distributed.device_mesh.init_device_mesh` over
    ``device_type`` (``"cuda"`` under NCCL, ``"cpu"`` under gloo), whose row-major rank order is the layout above,
    and a ``(dp, cp * ulysses)`` mesh for the sequence groups; a ``(world, 1)`` mesh gives each rank a group of its
    own (DeepSpeed's model-parallel group).
    """

    def __init__(self, cp: int, device_type: str = "cpu", ulysses: int = 1):
        world, rank = dist.get_world_size(), dist.get_rank()
        for name, value in (("train.cp", cp), ("train.ulysses", ulysses)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if world % (cp * ulysses):
            raise ValueError(f"train.cp * train.ulysses = {cp} * {ulysses} must divide the world size {world}")
        self.cp, self.ulysses, self.dp, self.rank = cp, ulysses, world // (cp * ulysses), rank
        self.mesh = init_device_mesh(device_type, (self.dp, cp, ulysses), mesh_dim_names=("dp", "cp", "ulysses"))
        self.sequence_group = init_device_mesh(device_type, (self.dp, cp * ulysses),
                                               mesh_dim_names=("dp", "sequence")).get_group("sequence")
        self.self_group = init_device_mesh(device_type, (world, 1), mesh_dim_names=("all", "self")).get_group("self")
        self.all_group = dist.group.WORLD

    @property
    def cp_group(self):
        """The context-parallel group of this rank."""
        return self.mesh.get_group("cp")

    @property
    def cp_rank(self) -> int:
        return self.rank // self.ulysses % self.cp

    @property
    def ulysses_group(self):
        """The Ulysses group of this rank."""
        return self.mesh.get_group("ulysses")

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses

    @property
    def sequence_size(self) -> int:
        """Ranks sharing every sequence: ``CP * U``."""
        return self.cp * self.ulysses

    @property
    def sequence_rank(self) -> int:
        """This rank's place in its sequence group (``cp_rank * U + ulysses_rank``)."""
        return self.rank % self.sequence_size

    @property
    def dp_group(self):
        """The data-parallel group of this rank (same sequence rank)."""
        return self.mesh.get_group("dp")

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sequence_size

    # --- DeepSpeed's mpu interface ---
    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self):
        return self.self_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        """The ZeRO-3 parameter partition group: every replica (``DP * CP * U`` ranks), not :attr:`dp_group`."""
        return self.all_group

    def get_sequence_parallel_rank(self) -> int:
        return self.sequence_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.sequence_size

    def get_sequence_parallel_group(self):
        return self.sequence_group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.sequence_size * self.dp

    def get_sequence_data_parallel_group(self):
        return self.all_group
