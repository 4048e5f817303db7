"""DeepSpeed integration: the training job's DeepSpeed backend (ZeRO 1-3, context parallelism through an ``mpu``,
exact resume) and DeepSpeed JSONs completed from the training YAML.

Needs ``pip install 'nsa-dist[deepspeed]'``. Launch: ``deepspeed --num_gpus N --module nsa_dist.train --config
configs/train/... --deepspeed_config configs/deepspeed/zero3.json``.
"""
from .config import fill_deepspeed_config, load_deepspeed_json
from .groups import ContextDataParallelGroups
from .requirements import require_deepspeed
from .trainer import train_deepspeed

__all__ = ["fill_deepspeed_config", "load_deepspeed_json", "ContextDataParallelGroups", "require_deepspeed",
           "train_deepspeed"]

