"""The plain backend of the training job: one process (CPU or one GPU), or ``train.cp * train.ulysses`` local gloo
processes on the CPU, each holding its piece of every sequence (context-parallel shard, Ulysses piece of it; losses
and gradients summed over the ranks, rank 0 reporting)."""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.utils.checkpoint
from tqdm import tqdm

from ..attention import NativeSparseAttention
from ..deepspeed.groups import ContextDataParallelGroups
from ..launch import run_local_group
from ..models import GPT
from ..selection_warmup import set_full_selection
from ..validation import ensure_writable_dir
from .config import TrainConfig
from .context_parallel import ContextParallelGroup, use_context_parallel
from .data import make_dataset
from .evaluation import evaluate_with_diagnostics
from .loss import batch_loss
from .optimizer import lr_at, parameter_groups


@dataclass
class StepStats:
    """One training step's batch loss, accuracy and token count, averaged over a logging window."""
    loss: float
    accuracy: float
    tokens: int


def mean_selection_loss(model: GPT) -> Optional[float]:
    """Mean over the NSA layers of the selection loss of the last training forward (None when it is off)."""
    values = [m.last_selection_loss for m in model.modules()
              if isinstance(m, NativeSparseAttention) and m.last_selection_loss is not None]
    return torch.stack(values).mean().item() if values else None


def train_plain(config: TrainConfig, device: Optional[str] = None, progress: bool = True,
                save_checkpoint: bool = True) -> Dict:
    """Train per ``config`` on this process (``train.cp == train.ulysses == 1``: ``device``, default CUDA if
    available) or on ``train.cp * train.ulysses`` local gloo processes on the CPU (the ``CP x U`` grid of
    :class:`~nsa_dist.deepspeed.ContextDataParallelGroups`); return the metrics written to
    ``<out_dir>/metrics.json``."""
    for name, unset in (("grad_accum", 1), ("save_every", None)):
        if getattr(config.train, name) != unset:
            raise ValueError(f"train.{name}={getattr(config.train, name)} needs the DeepSpeed backend "
                             f"(train.deepspeed_config or --deepspeed_config)")
    cp, ulysses = config.train.cp, config.train.ulysses
    if cp * ulysses == 1:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return train_on(config, dev, progress, ContextParallelGroup(), save_checkpoint)
    if device not in (None, "cpu"):
        raise ValueError(f"train.cp={cp} x train.ulysses={ulysses} runs local gloo processes on the CPU; --device "
                         f"{device!r} is not supported")
    threads = max(1, (config.train.threads or torch.get_num_threads()) // (cp * ulysses))
    return run_local_group(_train_rank, cp * ulysses, config, progress, save_checkpoint, threads=threads)[0]


def _train_rank(rank: int, world_size: int, config: TrainConfig, progress: bool, save_checkpoint: bool) -> Dict:
    """One process of ``train`` with ``train.cp * train.ulysses`` ranks (in the gloo group that
    :func:`run_local_group` set up)."""
    nsa = config.gpt_config(vocab_size=2).nsa_config()
    groups = ContextDataParallelGroups(config.train.cp, "cpu", config.train.ulysses)
    sequence = ContextParallelGroup.of_grid(groups, nsa.cp_layout, nsa.select_len)
    return train_on(config, torch.device("cpu"), progress and rank == 0, sequence, save_checkpoint)


def train_on(config: TrainConfig, dev: torch.device, progress: bool, cp: ContextParallelGroup,
             save_checkpoint: bool = True) -> Dict:
    """The training loop of one process of the sequence-parallel groups ``cp`` (a single process: both groups
    None); the rank holding the sequence's first piece writes the checkpoint and metrics. Returns the metrics."""
    out = ensure_writable_dir(config.out_dir)  # every rank, before any collective: all fail alike
    torch.manual_seed(config.seed)
    dataset = make_dataset(config)
    model = GPT(config.gpt_config(dataset.vocab_size)).to(dev)
    precision, chunk = config.train.precision, config.train.loss_chunk_tokens
    if cp.sequence_size > 1:
        use_context_parallel(model, cp.group, cp.ulysses_group)
    if config.train.activation_checkpointing:
        model.checkpoint_blocks = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.train.lr, betas=config.train.betas)
    train_gen = torch.Generator().manual_seed(config.seed)
    eval_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    seq_len, batch_size = config.data.seq_len, config.train.batch_size
    eval_dataset = make_dataset(config, "valid")
    eval_batches = [eval_dataset.sample(batch_size, seq_len, eval_gen) for _ in range(config.train.eval_batches)]

    initial = evaluate_with_diagnostics(model, eval_batches, dev, cp, precision, chunk)
    history, evals, step_times = [], [{"step": 0, **initial}], []
    tokens_seen = 0
    bar = tqdm(range(config.train.steps), desc=f"train {model.config.attention}", disable=not progress,
               dynamic_ncols=True)
    window: List[StepStats] = []
    full_selection_steps = model.config.nsa_config().selection_warmup_steps
    for step in bar:
        step_start = time.perf_counter()
        set_full_selection(model, step < full_selection_steps)
        if step < config.data.short_steps:
            batch = dataset.sample(batch_size * seq_len // config.data.short_seq_len, config.data.short_seq_len,
                                   train_gen)
        else:
            batch = dataset.sample(batch_size, seq_len, train_gen)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss, acc, (loss_value, acc_value) = batch_loss(model, batch, dev, cp, precision, chunk)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        cp.sum_gradients(model.parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip or math.inf)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        step_times.append(time.perf_counter() - step_start)
        tokens_seen += batch.tokens.numel()
        window.append(StepStats(loss_value, acc_value, batch.tokens.numel()))
        if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.steps:
            elapsed = sum(step_times)
            record = {"step": step + 1, "loss": sum(s.loss for s in window) / len(window),
                      "accuracy": sum(s.accuracy for s in window) / len(window), "lr": lr_at(step, config),
                      "grad_norm": grad_norm.item(), "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
            if (selection := mean_selection_loss(model)) is not None:
                record["selection_loss"] = selection
            history.append(record)
            window = []
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
        if config.train.eval_every and (step + 1) % config.train.eval_every == 0 and step + 1 < config.train.steps:
            evals.append({"step": step + 1,
                          **evaluate_with_diagnostics(model, eval_batches, dev, cp, precision, chunk)})
    train_time = sum(step_times)
    final = evaluate_with_diagnostics(model, eval_batches, dev, cp, precision, chunk)
    evals.append({"step": config.train.steps, **final})
    metrics = {"attention": model.config.attention, "parameters": model.num_parameters(),
               "device": str(dev), "cp": cp.world_size, "ulysses": cp.ulysses_size, "steps": config.train.steps,
               "tokens": tokens_seen,
               "train_time_s": train_time, "tokens_per_s": tokens_seen / train_time,
               "step_time_s": steady_step_time(step_times[config.data.short_steps:]), "precision": precision,
               "initial_eval": initial, "final_eval": final, "evals": evals, "history": history}
    if cp.sequence_rank != 0:
        return metrics
    if save_checkpoint:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": config.train.steps,
                    "model_config": model.config.to_dict(), "train_config": config.to_dict()}, out / "checkpoint.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def steady_step_time(step_times: List[float]) -> float:
    """Median wall-clock seconds per step, leaving out the first tenth of the steps (compilation, warm-up); the
    trainer passes the steps at ``data.seq_len`` (after a short-sequence phase)."""
    steady = sorted(step_times[len(step_times) // 10:])
    return steady[len(steady) // 2]
