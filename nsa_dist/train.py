"""The main job's command line: train the compact GPT (NSA or dense attention) with the backend the config
picks, the plain one (one process, CPU or GPU, or context-parallel over ``--cp N`` local gloo processes on the
CPU) or DeepSpeed's (``train.deepspeed_config``; one process per launcher rank).

``nsa-dist train --config configs/train/tiny-cpu.yaml`` (or ``python -m nsa_dist.train --config ...``) shows a
progress bar with loss, accuracy and tokens/s, evaluates on held-out batches before and after
training, and writes ``checkpoint.pt`` (loadable with ``torch.load(weights_only=True)``) and
``metrics.json`` to ``out_dir``. With ``--cp N`` every rank draws the same batches and keeps its shard of each
sequence (the NSA layers' ``cp_layout``); losses and gradients are summed over the ranks and rank 0 reports.
The training itself lives in :mod:`nsa_dist.training`.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional

import torch.distributed as dist

from .training import TrainConfig, train_deepspeed, train_plain


def train(config: TrainConfig, device: Optional[str] = None, progress: bool = True, resume: Optional[str] = None,
          resume_tag: Optional[str] = None, save_checkpoint: bool = True) -> Dict:
    """Train per ``config`` and return the metrics written to ``<out_dir>/metrics.json``: with
    ``train.deepspeed_config`` the DeepSpeed backend (:func:`nsa_dist.training.train_deepspeed`, one process per
    rank of the launcher; ``resume``/``resume_tag`` continue from its checkpoints), else the plain one
    (:func:`nsa_dist.training.train_plain`: ``train.cp > 1`` runs that many local gloo processes on the CPU, rank 0
    reporting)."""
    if config.train.deepspeed_config:
        return train_deepspeed(config, progress=progress, resume=resume, resume_tag=resume_tag,
                               save_final=save_checkpoint)
    if resume:
        raise ValueError("--resume needs the DeepSpeed backend (train.deepspeed_config or --deepspeed_config); the "
                         "plain job writes a weights-only checkpoint.pt")
    return train_plain(config, device, progress, save_checkpoint)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (e.g. configs/train/tiny-cpu.yaml)")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--out-dir", help="override out_dir (checkpoint.pt and metrics.json go there)")
    parser.add_argument("--text-file", help="train byte-level LM on this plain text file instead of the config's data")
    parser.add_argument("--attention", choices=["nsa", "dense"], help="override model.attention")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--cp", type=int, help="context-parallel ranks: override train.cp (local gloo processes on "
                        "the CPU, each holding T/cp tokens of every sequence; dense attention all-gathers K/V)")
    parser.add_argument("--ulysses", type=int, help="Ulysses ranks inside each context-parallel shard: override "
                        "train.ulysses (an all-to-all over heads; NSA attention only)")
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


def release_process_group() -> None:
    """End the default torch.distributed process group, if this process has one (the DeepSpeed backend starts it
    for the launcher's ranks), after a barrier: the command line owns it, and a group left to the interpreter's
    shutdown can abort a rank that already finished (``terminate called without an active exception``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_from_args(args: argparse.Namespace) -> Dict:
    """Load ``args.config``, apply the command-line overrides, train, end the process group the training started
    (:func:`release_process_group`), print a summary line."""
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
    if args.ulysses is not None:
        raw["train"]["ulysses"] = args.ulysses
    if args.deepspeed_config:
        raw["train"]["deepspeed_config"] = args.deepspeed_config
    config = TrainConfig.from_dict(raw)
    metrics = train(config, device=args.device, progress=not args.no_progress, resume=args.resume,
                    resume_tag=args.resume_tag, save_checkpoint=not args.no_checkpoint)
    release_process_group()
    if metrics.get("backend") == "deepspeed" and int(os.environ.get("RANK", "0")) != 0:
        return metrics
    i, f = metrics["initial_eval"], metrics["final_eval"]
    grid = f"CP {metrics['cp']} x U {metrics['ulysses']}" if metrics["ulysses"] > 1 else f"CP {metrics['cp']}"
    ranks = f" on {grid} ranks" if metrics["cp"] * metrics["ulysses"] > 1 else ""
    if metrics.get("backend") == "deepspeed":
        ranks = f" with DeepSpeed ZeRO-{metrics['zero_stage']} on DP {metrics['dp']} x {grid} ranks"
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
