"""The main job: train the compact GPT (NSA or dense attention) on one process, CPU or GPU, or context-parallel
over ``--cp N`` local gloo processes on the CPU.

``nsa-dist train --config configs/train/tiny-cpu.yaml`` (or ``python -m nsa_dist.train --config ...``) shows a
progress bar with loss, accuracy and tokens/s, evaluates on held-out batches before and after
training, and writes ``checkpoint.pt`` (loadable with ``torch.load(weights_only=True)``) and
``metrics.json`` to ``out_dir``. With ``--cp N`` every rank draws the same batches and keeps its shard of each
sequence (the NSA layers' ``cp_layout``); losses and gradients are summed over the ranks and rank 0 reports.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

from .attention import NativeSparseAttention
from .data import IGNORE_INDEX, Batch, ByteTextDataset, RetrievalTask
from .diagnostics import retrieval_diagnostics
from .models import DenseAttention, GPT
from .parallel.local_group import run_local_group
from .parallel.training import ContextParallelGroup
from .selection_warmup import set_full_selection
from .training_config import TrainConfig
from .validation import ensure_writable_dir


@dataclass
class StepStats:
    loss: float
    accuracy: float
    tokens: int


def make_dataset(config: TrainConfig, split: str = "train"):
    """The retrieval task or the byte-level text dataset named by ``config.data``; ``split`` (``"train"`` or
    ``"valid"``) picks a text file's part when ``data.valid_fraction`` holds a tail out (the retrieval task draws
    fresh sequences for both)."""
    if config.data.kind == "text":
        if not config.data.valid_fraction:
            return ByteTextDataset(config.data.text_file)
        return ByteTextDataset(config.data.text_file, split, config.data.valid_fraction)
    return RetrievalTask(**config.data.retrieval)


def autocast(device: torch.device, precision: str):
    """The forward's precision context: bf16 autocast for ``precision="bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_and_accuracy(model: GPT, batch: Batch, cp: ContextParallelGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the mean cross-entropy over the batch's labelled positions and of the fraction
    predicted exactly (argmax); summed over the context-parallel group (``cp.sum``) they are the batch's values."""
    targets = cp.shard(batch.targets)
    logits = model(cp.shard(batch.tokens))
    labelled = targets != IGNORE_INDEX
    count = (batch.targets != IGNORE_INDEX).sum().clamp_min(1)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / count
    correct = (logits.argmax(-1) == targets) & labelled
    return loss, correct.sum() / count


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_loss(model: GPT, batch: Batch, device: torch.device, cp: ContextParallelGroup,
               precision: str = "fp32") -> tuple:
    """``(loss share, accuracy share, [loss, accuracy] of the whole batch)``: the shares carry gradients, the
    batch values are summed over the group. ``precision="bf16"`` runs the forward under bf16 autocast."""
    with autocast(device, precision):
        loss, acc = loss_and_accuracy(model, Batch(batch.tokens.to(device), batch.targets.to(device)), cp)
    return loss, acc, cp.sum(torch.stack([loss.detach(), acc.detach()]).float()).tolist()


@torch.no_grad()
def evaluate(model: GPT, batches: List[Batch], device: torch.device, cp: ContextParallelGroup,
             precision: str = "fp32") -> Dict[str, float]:
    """Mean loss and accuracy over fixed held-out batches, with the NSA layers' top-n selection (a full-selection
    warm-up is switched off; the training loop sets it again at its next step)."""
    set_full_selection(model, False)
    model.eval()
    values = [batch_loss(model, batch, device, cp, precision)[2] for batch in batches]
    model.train()
    return {"loss": sum(v[0] for v in values) / len(values), "accuracy": sum(v[1] for v in values) / len(values)}


def evaluate_with_diagnostics(model: GPT, batches: List[Batch], device: torch.device, cp: ContextParallelGroup,
                              precision: str = "fp32") -> Dict:
    """:func:`evaluate`, plus ``"diagnostics"`` (:func:`nsa_dist.diagnostics.retrieval_diagnostics`: selection
    recall, compressed mass on the needle and gates per NSA layer and KV head, accuracy by needle depth) for
    retrieval batches on a single rank."""
    result = evaluate(model, batches, device, cp, precision)
    if cp.group is None and batches and batches[0].needles is not None:
        result["diagnostics"] = retrieval_diagnostics(model, batches, device,
                                                      functools.partial(autocast, device, precision))
    return result


def mean_selection_loss(model: GPT) -> Optional[float]:
    """Mean over the NSA layers of the selection loss of the last training forward (None when it is off)."""
    values = [m.last_selection_loss for m in model.modules()
              if isinstance(m, NativeSparseAttention) and m.last_selection_loss is not None]
    return torch.stack(values).mean().item() if values else None


def use_context_parallel(model: GPT, group) -> None:
    """Make every attention layer of ``model`` (NSA or dense) context-parallel over ``group``; dense layers take
    the NSA layers' ``cp_layout`` (``model.nsa``), the layout batches are sharded in."""
    for module in model.modules():
        if isinstance(module, NativeSparseAttention):
            module.cp_group = group
        elif isinstance(module, DenseAttention):
            module.cp_group, module.cp_layout = group, model.config.nsa_config().cp_layout


def train(config: TrainConfig, device: Optional[str] = None, progress: bool = True, resume: Optional[str] = None,
          resume_tag: Optional[str] = None, save_checkpoint: bool = True) -> Dict:
    """Train per ``config`` and return the metrics written to ``<out_dir>/metrics.json`` (with ``train.cp > 1``
    on that many local gloo processes on the CPU, rank 0 reporting; with ``train.deepspeed_config`` the DeepSpeed
    backend, one process per rank of the launcher: :func:`nsa_dist.deepspeed.train_deepspeed`)."""
    if config.train.deepspeed_config:
        from .deepspeed import train_deepspeed

        return train_deepspeed(config, progress=progress, resume=resume, resume_tag=resume_tag,
                               save_final=save_checkpoint)
    if resume:
        raise ValueError("--resume needs the DeepSpeed backend (train.deepspeed_config or --deepspeed_config); the "
                         "plain job writes a weights-only checkpoint.pt")
    for name, unset in (("grad_accum", 1), ("save_every", None)):
        if getattr(config.train, name) != unset:
            raise ValueError(f"train.{name}={getattr(config.train, name)} needs the DeepSpeed backend "
                             f"(train.deepspeed_config or --deepspeed_config)")
    cp = config.train.cp
    if cp == 1:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return train_on(config, dev, progress, ContextParallelGroup(), save_checkpoint)
    if device not in (None, "cpu"):
        raise ValueError(f"--cp {cp} runs local gloo processes on the CPU; --device {device!r} is not supported")
    threads = max(1, (config.train.threads or torch.get_num_threads()) // cp)
    return run_local_group(_train_rank, cp, config, progress, save_checkpoint, threads=threads)[0]


def _train_rank(rank: int, world_size: int, config: TrainConfig, progress: bool, save_checkpoint: bool) -> Dict:
    """One process of ``train --cp N`` (in the gloo group that :func:`run_local_group` set up)."""
    nsa = config.gpt_config(vocab_size=2).nsa_config()
    group = ContextParallelGroup(dist.group.WORLD, nsa.cp_layout, nsa.select_len)
    return train_on(config, torch.device("cpu"), progress and rank == 0, group, save_checkpoint)


def parameter_groups(model: GPT, config: TrainConfig) -> List[Dict]:
    """AdamW groups: weight decay on matrices and embeddings, none on norms, biases and 1-d parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": config.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_on(config: TrainConfig, dev: torch.device, progress: bool, cp: ContextParallelGroup,
             save_checkpoint: bool = True) -> Dict:
    """The training loop of one process of context-parallel group ``cp`` (a single process: ``cp.group=None``);
    rank 0 writes the checkpoint and metrics. Returns the metrics."""
    out = ensure_writable_dir(config.out_dir)  # every rank, before any collective: all fail alike
    torch.manual_seed(config.seed)
    dataset = make_dataset(config)
    model = GPT(config.gpt_config(dataset.vocab_size)).to(dev)
    precision = config.train.precision
    if cp.group is not None:
        use_context_parallel(model, cp.group)
    if config.train.activation_checkpointing:
        model.checkpoint_blocks = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.train.lr, betas=config.train.betas)
    train_gen = torch.Generator().manual_seed(config.seed)
    eval_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    seq_len, batch_size = config.data.seq_len, config.train.batch_size
    eval_dataset = make_dataset(config, "valid")
    eval_batches = [eval_dataset.sample(batch_size, seq_len, eval_gen) for _ in range(config.train.eval_batches)]

    initial = evaluate_with_diagnostics(model, eval_batches, dev, cp, precision)
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
        loss, acc, (loss_value, acc_value) = batch_loss(model, batch, dev, cp, precision)
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
            evals.append({"step": step + 1, **evaluate_with_diagnostics(model, eval_batches, dev, cp, precision)})
    train_time = sum(step_times)
    final = evaluate_with_diagnostics(model, eval_batches, dev, cp, precision)
    evals.append({"step": config.train.steps, **final})
    metrics = {"attention": model.config.attention, "parameters": model.num_parameters(),
               "device": str(dev), "cp": cp.world_size, "steps": config.train.steps, "tokens": tokens_seen,
               "train_time_s": train_time, "tokens_per_s": tokens_seen / train_time,
               "step_time_s": steady_step_time(step_times[config.data.short_steps:]), "precision": precision,
               "initial_eval": initial, "final_eval": final, "evals": evals, "history": history}
    if cp.rank != 0:
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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (e.g. configs/train/tiny-cpu.yaml)")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--out-dir", help="override out_dir (checkpoint.pt and metrics.json go there)")
    parser.add_argument("--text-file", help="train byte-level LM on this plain text file instead of the config's data")
    parser.add_argument("--attention", choices=["nsa", "dense"], help="override model.attention")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--cp", type=int, help="context-parallel ranks: override train.cp (local gloo processes on "
                        "the CPU, each holding T/cp tokens of every sequence; NSA attention only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only the summary)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed JSON (e.g. configs/deepspeed/zero3.json): override train.deepspeed_config, "
                        "selecting the DeepSpeed backend (launch with deepspeed / torchrun / mpirun)")
    parser.add_argument("--resume", help="DeepSpeed backend: checkpoint directory to resume from "
                        "(e.g. runs/x/checkpoints)")
    parser.add_argument("--resume-tag", help="checkpoint tag to resume (e.g. step300; default: the latest)")
    parser.add_argument("--no-checkpoint", action="store_true", help="do not write the final checkpoint (throughput "
                        "runs); DeepSpeed's save_every checkpoints are still written")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher


def run_from_args(args: argparse.Namespace) -> Dict:
    """Load ``args.config``, apply the command-line overrides, train, print a summary line."""
    config = TrainConfig.load(args.config)
    raw = config.to_dict()
    if args.steps is not None:
        raw["train"]["steps"] = args.steps
    if args.out_dir:
        raw["out_dir"] = args.out_dir
    if args.text_file:
        raw["data"]["kind"], raw["data"]["text_file"] = "text", args.text_file
    if args.attention:
        raw["model"]["attention"] = args.attention
    if args.seed is not None:
        raw["seed"] = args.seed
    if args.cp is not None:
        raw["train"]["cp"] = args.cp
    if args.deepspeed_config:
        raw["train"]["deepspeed_config"] = args.deepspeed_config
    config = TrainConfig.from_dict(raw)
    metrics = train(config, device=args.device, progress=not args.no_progress, resume=args.resume,
                    resume_tag=args.resume_tag, save_checkpoint=not args.no_checkpoint)
    if metrics.get("backend") == "deepspeed" and int(os.environ.get("RANK", "0")) != 0:
        return metrics
    i, f = metrics["initial_eval"], metrics["final_eval"]
    ranks = f" on {metrics['cp']} context-parallel ranks" if metrics["cp"] > 1 else ""
    if metrics.get("backend") == "deepspeed":
        ranks = f" with DeepSpeed ZeRO-{metrics['zero_stage']} on DP {metrics['dp']} x CP {metrics['cp']} ranks"
    print(f"done{ranks}: {metrics['steps']} steps in {metrics['train_time_s']:.1f} s, "
          f"{metrics['tokens_per_s']:.0f} tokens/s; "
          f"eval loss {i['loss']:.3f} -> {f['loss']:.3f}, accuracy {i['accuracy']:.3f} -> {f['accuracy']:.3f}; "
          f"wrote {config.out_dir}/metrics.json"
          + ("" if args.no_checkpoint else
             f" and {'checkpoints/' if metrics.get('backend') == 'deepspeed' else 'checkpoint.pt'}"))
    return metrics


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nsa_dist.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
