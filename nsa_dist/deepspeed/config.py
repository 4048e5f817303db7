"""A DeepSpeed JSON completed from the training YAML.

The YAML owns the model, data, steps, the global batch, context and Ulysses parallelism and the optimiser
hyper-parameters it names; the JSON owns ZeRO, precision, activation-checkpointing details, the optimizer and
scheduler types and their other parameters. A key the JSON leaves out is filled from the YAML; a key both set must
agree (ValueError naming both values), so a JSON a DeepSpeed user already has keeps working and nothing is silently
overridden.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Union

if TYPE_CHECKING:  # the training package builds on this one: an annotation only, no import at run time
    from ..training.config import TrainConfig


def load_deepspeed_json(path: Union[str, Path]) -> Dict[str, Any]:
    """The JSON at ``path`` (FileNotFoundError / ValueError naming the path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from err


def fill_deepspeed_config(ds: Dict[str, Any], config: TrainConfig, dp: int) -> Dict[str, Any]:
    """A copy of DeepSpeed config ``ds`` completed from ``config`` for ``dp`` data-parallel ranks.

    Filled (or checked): ``train_batch_size = train.batch_size``, ``gradient_accumulation_steps =
    train.grad_accum``, ``train_micro_batch_size_per_gpu = batch_size / (dp * grad_accum)``,
    ``sequence_parallel_size = train.cp * train.ulysses`` (DeepSpeed's meaning: the ranks that share one sequence,
    whose gradients DeepSpeed sums while it averages over ``DP = world / sequence_parallel_size``; also what the
    ``mpu`` of :class:`~nsa_dist.deepspeed.ContextDataParallelGroups` reports), ``gradient_clipping =
    train.grad_clip``, the optimizer's ``lr``, ``betas`` and ``weight_decay`` (an AdamW block when there is none;
    ``torch_adam`` so no CUDA extension is built) and a ``WarmupCosineLR`` scheduler's ``total_num_steps``,
    ``warmup_num_steps`` and ``cos_min_ratio`` (the YAML's linear warm-up and cosine decay when there is none).
    """
    t = config.train
    per_rank = dp * t.grad_accum
    if t.batch_size % per_rank:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by data-parallel ranks * grad_accum = "
                         f"{dp} * {t.grad_accum}")
    out = copy.deepcopy(ds)
    _fill(out, "train_batch_size", t.batch_size, "train.batch_size")
    _fill(out, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    _fill(out, "train_micro_batch_size_per_gpu", t.batch_size // per_rank, "train.batch_size / (DP * grad_accum)")
    _fill(out, "sequence_parallel_size", t.cp * t.ulysses, "train.cp * train.ulysses")
    _fill(out, "gradient_clipping", t.grad_clip, "train.grad_clip")
    optimizer = out.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", t.lr, "train.lr", where="optimizer.params.")
    _fill(params, "betas", list(t.betas), "train.betas", where="optimizer.params.")
    _fill(params, "weight_decay", t.weight_decay, "train.weight_decay", where="optimizer.params.")
    scheduler = out.setdefault("scheduler", {"type": "WarmupCosineLR",
                                              "params": {"warmup_min_ratio": 0.0, "warmup_type": "linear"}})
    if scheduler.get("type") == "WarmupCosineLR":
        if t.warmup_steps < 1:
            raise ValueError(f"train.warmup_steps={t.warmup_steps}: DeepSpeed's WarmupCosineLR needs at least 1 "
                             f"warm-up step")
        sp = scheduler.setdefault("params", {})
        _fill(sp, "total_num_steps", t.steps, "train.steps", where="scheduler.params.")
        _fill(sp, "warmup_num_steps", t.warmup_steps, "train.warmup_steps", where="scheduler.params.")
        _fill(sp, "cos_min_ratio", t.min_lr_ratio, "train.min_lr_ratio", where="scheduler.params.")
    return out


def _fill(section: Dict[str, Any], key: str, value: Any, source: str, where: str = "") -> None:
    if key not in section:
        section[key] = value
        return
    present = section[key]
    same = (list(present) == list(value)) if isinstance(value, list) and isinstance(present, (list, tuple)) \
        else present == value
    if not same:
        raise ValueError(f"DeepSpeed config {where}{key}={present!r} disagrees with the training YAML's {source}="
                         f"{value!r}; remove it from the JSON or make them equal")
