"""Ray Train launch of the training job: one Ray Train worker per rank runs the DeepSpeed backend.

Submitted to a Ray cluster (``configs/ray/cluster.yaml``)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m nsa_dist.launch.ray --config configs/train/gpt-1b-128k-cp8.yaml --num-workers 8 --gpus-per-worker 1

A :class:`ray.train.torch.TorchTrainer` starts ``--num-workers`` workers (``--gpus-per-worker 0``: CPU workers) and
joins them in one torch.distributed process group (NCCL on GPUs, gloo on the CPU); in it each worker runs
:func:`nsa_dist.training.train_deepspeed`, which builds the ``DP x CP`` groups of the YAML's ``train.cp``. Every
logged step's metrics go to Ray (``ray.train.report``); every DeepSpeed checkpoint (``train.save_every`` and the
last step) is reported as a Ray Train checkpoint named ``step<N>`` under ``<storage-path>/<run-name>/``, uploaded
once per node (the node's part of the DeepSpeed files). When a worker fails, Ray Train restarts the group up to
``--max-failures`` times and the job resumes from the last reported checkpoint through DeepSpeed's own loader,
replaying the data an uninterrupted run sees (per-step batch generators). Ray keeps the newest
``train.keep_checkpoints`` checkpoints (default 2; ``--keep-checkpoints`` overrides it) and deletes older ones from
the storage path.

Safety: Ray's dashboard and job API run code for anyone who reaches them (authentication is off unless token auth is
turned on); start the head with ``--dashboard-host 127.0.0.1`` (or a private interface), turn on token auth
(``RAY_AUTH_MODE=token``) and reach it through an SSH tunnel. Needs ``pip install 'nsa-dist[ray]'``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List, Optional

try:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer, get_device
except ImportError as err:
    raise ImportError(f"nsa_dist.launch.ray needs Ray Train: pip install 'nsa-dist[ray]' (import failed: {err})") \
        from err

import torch

from ..training import TrainConfig, train_deepspeed


def train_loop_per_worker(loop_config: Dict) -> None:
    """One Ray Train worker: the DeepSpeed backend in the process group Ray set up (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` set by Ray), resumed from ``ray.train.get_checkpoint()`` when Ray restarts the group.
    ``loop_config``: ``{"config": TrainConfig.to_dict(), "cwd": the driver's directory}``; the worker moves there
    where its node has that directory (one node; under ``ray job submit --working-dir`` Ray's copy of the working
    directory), so the YAML's relative paths mean what they mean to the driver, as under torchrun or mpirun."""
    if os.path.isdir(loop_config["cwd"]):
        os.chdir(loop_config["cwd"])
    config = TrainConfig.from_dict(loop_config["config"])
    if torch.cuda.is_available():
        # DeepSpeed and the trainer pick the GPU by LOCAL_RANK; Ray shows every worker all GPUs of its node, in an
        # order that need not follow the local rank, and get_device() is the one Ray assigned to this worker
        os.environ["LOCAL_RANK"] = str(get_device().index)
    uploads = ray.train.get_context().get_local_rank() == 0
    final_dir: List[Path] = []  # the last step's checkpoint, reported with the final metrics

    def report(metrics: Dict, checkpoint_dir: Optional[Path]) -> None:
        """``ray.train.report`` (every worker calls it the same number of times); the first worker of each node
        uploads the checkpoint files its node wrote, into the Ray checkpoint ``step<N>``."""
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir and uploads else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir else None)

    def on_step(step: int, record: Optional[Dict], checkpoint_dir: Optional[Path]) -> None:
        if record is None and step == config.train.steps:
            final_dir.append(checkpoint_dir)
        else:
            report({"step": step, **(record or {})}, checkpoint_dir)

    restored = ray.train.get_checkpoint()
    if restored is None:
        metrics = train_deepspeed(config, progress=False, callback=on_step)
    else:
        with restored.as_directory() as directory:
            path = Path(directory)  # holds the files of one DeepSpeed tag: load it as tag <name> of its parent
            metrics = train_deepspeed(config, progress=False, resume=str(path.parent), resume_tag=path.name,
                                      callback=on_step)
    report({"step": metrics["steps"], "start_step": metrics["start_step"],
            "initial_eval_loss": metrics["initial_eval"]["loss"], "final_eval_loss": metrics["final_eval"]["loss"],
            "final_eval_accuracy": metrics["final_eval"]["accuracy"], "train_time_s": metrics["train_time_s"],
            "tokens_per_s": metrics["tokens_per_s"]}, final_dir[0] if final_dir else None)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nsa_dist.launch.ray", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training YAML (e.g. configs/train/gpt-1b-128k-cp8.yaml)")
    parser.add_argument("--num-workers", type=int, required=True, help="Ray Train workers = ranks (DP x CP)")
    parser.add_argument("--gpus-per-worker", type=float, default=1, help="GPUs per worker (0: CPU workers, gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs Ray reserves per worker")
    parser.add_argument("--backend", choices=["deepspeed", "megatron"], default="deepspeed",
                        help="training backend (only deepspeed runs under Ray)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed JSON: override train.deepspeed_config")
    parser.add_argument("--storage-path", help="where Ray Train keeps checkpoints and run state: a directory every "
                        "node shares, or a URI (s3://...); default Ray's (~/ray_results, one node only)")
    parser.add_argument("--run-name", help="Ray Train run name (default: generated); reusing a name continues that "
                        "run from its last checkpoint")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="restarts of the worker group after a worker fails (each resumes from the last "
                        "checkpoint); -1: unlimited")
    parser.add_argument("--keep-checkpoints", type=_keep_count, metavar="N|all", default=argparse.SUPPRESS,
                        help="newest Ray checkpoints kept in the storage path, older ones deleted; 'all' keeps "
                        "every one (overrides train.keep_checkpoints, default 2)")
    return parser.parse_args(argv)


def _keep_count(text: str) -> Optional[int]:
    """``--keep-checkpoints``: ``all`` (None: keep every checkpoint) or a whole number, checked by the config."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or 'all', got {text!r}") from None


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The YAML with the command line's overrides, checked before any worker starts.

    Raises:
        ValueError: ``--backend megatron``, no DeepSpeed JSON, a non-positive worker count or negative GPUs/CPUs,
            ``train.cp`` not dividing ``--num-workers``, or a ``--keep-checkpoints`` below 1.
        FileNotFoundError: the YAML or the DeepSpeed JSON does not exist."""
    if args.backend == "megatron":
        raise ValueError("--backend megatron is not supported under Ray: launch the Megatron example with torchrun "
                         "(examples/megatron/pretrain_gpt_nsa.sh), or use --backend deepspeed")
    if args.num_workers < 1:
        raise ValueError(f"--num-workers {args.num_workers} must be at least 1")
    for name in ("gpus_per_worker", "cpus_per_worker"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must not be negative")
    raw = TrainConfig.load(args.config).to_dict()
    if args.deepspeed_config:
        raw["train"]["deepspeed_config"] = args.deepspeed_config
    if "keep_checkpoints" in vars(args):
        raw["train"]["keep_checkpoints"] = args.keep_checkpoints
    config = TrainConfig.from_dict(raw)
    if not config.train.deepspeed_config:
        raise ValueError(f"{args.config} names no DeepSpeed JSON (train.deepspeed_config): pass --deepspeed_config "
                         f"configs/deepspeed/zero2.json or another")
    if not Path(config.train.deepspeed_config).is_file():
        raise FileNotFoundError(f"DeepSpeed config {config.train.deepspeed_config!r} does not exist (paths are "
                                f"relative to the job's working directory)")
    if args.num_workers % config.train.cp:
        raise ValueError(f"train.cp={config.train.cp} does not divide --num-workers {args.num_workers}")
    return config


def make_trainer(args: argparse.Namespace, config: TrainConfig) -> TorchTrainer:
    """The TorchTrainer of the job: scaling, process group backend, storage, checkpoint retention
    (``train.keep_checkpoints``), failure handling."""
    gpus = args.gpus_per_worker
    resources = {"CPU": args.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    storage = args.storage_path
    if storage and "://" not in storage:
        storage = str(Path(storage).resolve())
    return TorchTrainer(
        train_loop_per_worker, train_loop_config={"config": config.to_dict(), "cwd": os.getcwd()},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=args.num_workers, use_gpu=bool(gpus),
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=args.run_name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures)))


def main(argv: Optional[List[str]] = None) -> ray.train.Result:
    """Parse the command line, train on Ray, print a summary line; returns Ray Train's result."""
    args = parse_args(argv)
    config = build_config(args)
    result = make_trainer(args, config).fit()
    m = result.metrics
    print(f"done on Ray: {args.num_workers} workers (CP {config.train.cp}), steps {m['start_step']}..{m['step']} in "
          f"the last attempt, {m['tokens_per_s']:.0f} tokens/s; eval loss {m['initial_eval_loss']:.4f} -> "
          f"{m['final_eval_loss']:.4f}; checkpoint {result.checkpoint.path if result.checkpoint else None}; "
          f"metrics in {config.out_dir}/metrics.json", flush=True)
    return result


if __name__ == "__main__":
    main()
