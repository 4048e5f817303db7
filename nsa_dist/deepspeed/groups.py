"""Context- and data-parallel process groups of a DeepSpeed job, and the ``mpu`` object DeepSpeed reads them from."""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


class ContextDataParallelGroups:
    """Ranks ``0 .. W-1`` as ``DP x CP``: consecutive groups of ``cp`` ranks share every sequence (context
    parallel, ``rank // cp`` is the data-parallel index), ranks with the same ``rank % cp`` form a data-parallel
    group (DP excludes the CP ranks). Every rank must construct it (it creates process groups).

    As DeepSpeed's ``mpu`` (``deepspeed.initialize(mpu=...)``) it reports no model parallelism, the CP group as
    DeepSpeed's sequence-parallel group and all ``DP * CP`` ranks (every replica of the parameters) as its
    sequence-data-parallel group: DeepSpeed partitions the ZeRO optimizer state over that group and reduces
    gradients over it, summing over CP and averaging over DP, so each rank's loss is its share of its
    data-parallel batch's mean. DeepSpeed reads two different things from the data-parallel names: the *size and
    rank* for batch arithmetic (``train_batch_size = micro * grad_accum * DP``) and sampling, which exclude CP,
    and the *group* ZeRO-3 partitions the parameters over, which must be the same replicas as the optimizer's
    (DeepSpeed's own sequence-parallel state leaves it to the whole world for that reason).

    The groups come from a ``(dp, cp)`` :func:`~torch.distributed.device_mesh.init_device_mesh` over
    ``device_type`` (``"cuda"`` under NCCL, ``"cpu"`` under gloo), whose row-major rank order is the layout above;
    a ``(world, 1)`` mesh gives each rank a group of its own (DeepSpeed's model-parallel group).
    """

    def __init__(self, cp: int, device_type: str = "cpu"):
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1 or world % cp:
            raise ValueError(f"context-parallel size train.cp={cp!r} must divide the world size {world}")
        self.cp, self.dp, self.rank = cp, world // cp, rank
        self.mesh = init_device_mesh(device_type, (self.dp, cp), mesh_dim_names=("dp", "cp"))
        self.self_group = init_device_mesh(device_type, (world, 1), mesh_dim_names=("all", "self")).get_group("self")
        self.all_group = dist.group.WORLD

    @property
    def cp_group(self):
        """The context-parallel group of this rank."""
        return self.mesh.get_group("cp")

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def dp_group(self):
        """The data-parallel group of this rank (same CP index)."""
        return self.mesh.get_group("dp")

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

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
        """The ZeRO-3 parameter partition group: every replica (``DP * CP`` ranks), not :attr:`dp_group`."""
        return self.all_group

    def get_sequence_parallel_rank(self) -> int:
        return self.cp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.cp

    def get_sequence_parallel_group(self):
        return self.cp_group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.cp * self.dp

    def get_sequence_data_parallel_group(self):
        return self.all_group
