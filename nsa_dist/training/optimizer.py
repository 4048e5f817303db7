"""AdamW parameter groups and the learning-rate schedule of the training job."""
from __future__ import annotations

import math
from typing import Dict, List

from ..models import GPT
from .config import TrainConfig


def parameter_groups(model: GPT, config: TrainConfig) -> List[Dict]:
    """AdamW groups: weight decay on matrices and embeddings, none on norms, biases and 1-d parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": config.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
