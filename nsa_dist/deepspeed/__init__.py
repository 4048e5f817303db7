"""DeepSpeed integration pieces: DeepSpeed JSONs completed from the training YAML, the ``DP x CP x U`` process
groups (data, context and Ulysses parallelism) DeepSpeed reads through an ``mpu``, and the check that DeepSpeed is
installed. The training job's DeepSpeed backend that uses them is :func:`nsa_dist.training.train_deepspeed`.

Needs ``pip install 'nsa-dist[deepspeed]'``. Launch: ``deepspeed --num_gpus N --module nsa_dist.train --config
configs/train/... --deepspeed_config configs/deepspeed/zero3.json``.
"""
from .config import fill_deepspeed_config, load_deepspeed_json
from .gradient_scale import sequence_parallel_loss_scale
from .groups import ContextDataParallelGroups
from .requirements import require_deepspeed
from .shared_memory import unlink_cpu_allreduce_buffer

__all__ = ["fill_deepspeed_config", "load_deepspeed_json", "ContextDataParallelGroups", "require_deepspeed",
           "sequence_parallel_loss_scale", "unlink_cpu_allreduce_buffer"]

