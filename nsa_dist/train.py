"""The main job: train the compact GPT (NSA or dense attention) on one process, CPU or GPU.

``nsa-dist train --config configs/tiny-cpu.yaml`` (or ``python -m nsa_dist.train --config ...``) shows a
progress bar with loss, accuracy and tokens/s, evaluates on held-out batches before and after
training, and writes ``checkpoint.pt`` (loadable with ``torch.load(weights_only=True)``) and
``metrics.json`` to ``out_dir``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import IGNORE_INDEX, Batch, ByteTextDataset, RetrievalTask
from .models import GPT
from .training_config import TrainConfig


@dataclass
class StepStats:
    loss: float
    accuracy: float
    tokens: int


def make_dataset(config: TrainConfig):
    """The retrieval task or the byte-level text dataset named by ``config.data``."""
    if config.data.kind == "text":
        return ByteTextDataset(config.data.text_file)
    return RetrievalTask(**config.data.retrieval)


def loss_and_accuracy(model: GPT, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the labelled positions and the fraction predicted exactly (argmax)."""
    logits = model(batch.tokens)
    labelled = batch.targets != IGNORE_INDEX
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    correct = (logits.argmax(-1) == batch.targets) & labelled
    return loss, correct.sum() / labelled.sum().clamp_min(1)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model: GPT, batches: List[Batch], device: torch.device) -> Dict[str, float]:
    """Mean loss and accuracy over fixed held-out batches."""
    model.eval()
    losses, accs = [], []
    for batch in batches:
        loss, acc = loss_and_accuracy(model, Batch(batch.tokens.to(device), batch.targets.to(device)))
        losses.append(loss.item())
        accs.append(acc.item())
    model.train()
    return {"loss": sum(losses) / len(losses), "accuracy": sum(accs) / len(accs)}


def train(config: TrainConfig, device: Optional[str] = None, progress: bool = True) -> Dict:
    """Train per ``config`` and return the metrics written to ``<out_dir>/metrics.json``."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    dataset = make_dataset(config)
    model = GPT(config.gpt_config(dataset.vocab_size)).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.train.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.train.lr,
                                  betas=config.train.betas)
    train_gen = torch.Generator().manual_seed(config.seed)
    eval_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    seq_len, batch_size = config.data.seq_len, config.train.batch_size
    eval_batches = [dataset.sample(batch_size, seq_len, eval_gen) for _ in range(config.train.eval_batches)]

    initial = evaluate(model, eval_batches, dev)
    history = []
    start = time.perf_counter()
    tokens_seen = 0
    bar = tqdm(range(config.train.steps), desc=f"train {model.config.attention}", disable=not progress,
               dynamic_ncols=True)
    window: List[StepStats] = []
    for step in bar:
        batch = dataset.sample(batch_size, seq_len, train_gen)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss, acc = loss_and_accuracy(model, Batch(batch.tokens.to(dev), batch.targets.to(dev)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        optimizer.step()
        tokens_seen += batch.tokens.numel()
        window.append(StepStats(loss.item(), acc.item(), batch.tokens.numel()))
        if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.steps:
            elapsed = time.perf_counter() - start
            record = {"step": step + 1, "loss": sum(s.loss for s in window) / len(window),
                      "accuracy": sum(s.accuracy for s in window) / len(window), "lr": lr_at(step, config),
                      "grad_norm": grad_norm.item(), "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
            history.append(record)
            window = []
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
    train_time = time.perf_counter() - start
    final = evaluate(model, eval_batches, dev)

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": config.train.steps,
                "model_config": model.config.to_dict(), "train_config": config.to_dict()}, out / "checkpoint.pt")
    metrics = {"attention": model.config.attention, "parameters": model.num_parameters(),
               "device": str(dev), "steps": config.train.steps, "tokens": tokens_seen,
               "train_time_s": train_time, "tokens_per_s": tokens_seen / train_time,
               "initial_eval": initial, "final_eval": final, "history": history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (e.g. configs/tiny-cpu.yaml)")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--out-dir", help="override out_dir (checkpoint.pt and metrics.json go there)")
    parser.add_argument("--text-file", help="train byte-level LM on this plain text file instead of the config's data")
    parser.add_argument("--attention", choices=["nsa", "dense"], help="override model.attention")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only the summary)")


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
    config = TrainConfig.from_dict(raw)
    metrics = train(config, device=args.device, progress=not args.no_progress)
    i, f = metrics["initial_eval"], metrics["final_eval"]
    print(f"done: {metrics['steps']} steps in {metrics['train_time_s']:.1f} s, {metrics['tokens_per_s']:.0f} tokens/s; "
          f"eval loss {i['loss']:.3f} -> {f['loss']:.3f}, accuracy {i['accuracy']:.3f} -> {f['accuracy']:.3f}; "
          f"wrote {config.out_dir}/checkpoint.pt and metrics.json")
    return metrics


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nsa_dist.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
