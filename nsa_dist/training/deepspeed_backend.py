"""The DeepSpeed backend of the training job: ZeRO, context and Ulysses parallelism, checkpoints that resume
exactly.

Launched once per rank (``deepspeed``, ``torchrun``, ``mpirun``)::

    deepspeed --num_gpus 8 --module nsa_dist.train --config configs/train/gpt-1b-128k-cp8.yaml \\
        --deepspeed_config configs/deepspeed/zero3.json

Ranks form ``DP x CP x U`` (:class:`ContextDataParallelGroups`, ``train.cp`` and ``train.ulysses``); every rank of a
sequence group (``CP x U`` ranks) draws the same batch and keeps its piece of each sequence (its layout shard, then
its Ulysses piece of it), data-parallel ranks draw different batches. Batches come from a generator
seeded by ``(seed, step, micro-step, DP rank)``, so resuming at a step replays exactly the data an uninterrupted run
would have seen; checkpoints (``engine.save_checkpoint``) hold model, optimizer, scheduler, the step and the RNG
states.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..deepspeed import (ContextDataParallelGroups, fill_deepspeed_config, load_deepspeed_json, require_deepspeed,
                         sequence_parallel_loss_scale, unlink_cpu_allreduce_buffer)
from ..deepspeed.checkpoints import available_tags, checkpoint_tag, load_client_state, model_states_file
from ..launch import (discover_launch, export_torch_env, free_port, launcher_present, master_port,
                      mpi4py_matches_launch)
from ..models import GPT
from ..selection_warmup import set_full_selection
from ..validation import ensure_writable_dir
from .config import TrainConfig
from .context_parallel import ContextParallelGroup, use_context_parallel
from .data import make_dataset
from .evaluation import evaluate
from .loss import batch_loss
from .optimizer import parameter_groups

CHECKPOINT_DIR = "checkpoints"

# ``callback(step, record, checkpoint_dir)`` of :func:`train_deepspeed`
StepCallback = Callable[[int, Optional[Dict], Optional[Path]], None]


def batch_generator(seed: int, step: int, micro: int, dp_rank: int) -> torch.Generator:
    """The generator of one micro-batch: a function of the position in training only (exact resume)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 65_537 + dp_rank)


def train_deepspeed(config: TrainConfig, progress: bool = True, resume: Optional[str] = None,
                    resume_tag: Optional[str] = None, save_final: bool = True,
                    callback: Optional[StepCallback] = None) -> Dict:
    """Train per ``config`` with DeepSpeed (``config.train.deepspeed_config``); return the metrics rank 0 writes to
    ``<out_dir>/metrics.json`` (every rank returns its own copy). ``resume``: a checkpoint directory (e.g.
    ``<out_dir>/checkpoints``) to continue from, at ``resume_tag`` or DeepSpeed's ``latest``, checked before
    anything distributed starts (a missing tag, a truncated file or a step at or past ``train.steps`` is an
    error, the same on every rank: :func:`_check_resume`). ``save_final``: write the last step's checkpoint
    (``train.save_every`` checkpoints are written regardless). ``callback(step, record, checkpoint_dir)``: called
    on every rank once for each step that logged (``record``: its log line, else None) or saved
    (``checkpoint_dir``: the saved ``<out_dir>/checkpoints/step<N>``, complete on every rank, else None), e.g. to
    report to Ray Train; the final checkpoint comes as ``(steps, None, dir)`` after the final evaluation."""
    require_deepspeed()
    for section, name, plain_only in (("train", "precision", "fp32"), ("train", "eval_every", None),
                                      ("data", "short_steps", 0)):
        value = getattr(getattr(config, section), name)
        if value != plain_only:
            raise ValueError(f"{section}.{name}={value!r} applies to the plain backend; under DeepSpeed set the "
                             "precision in the JSON's bf16/fp16 section, and leave eval_every and short_steps unset")
    resume_tag = _check_resume(resume, resume_tag, config.train.steps) if resume else None
    out = ensure_writable_dir(config.out_dir)  # every rank, before the process group: all fail alike
    import deepspeed

    device = _init_distributed(deepspeed)
    groups = ContextDataParallelGroups(config.train.cp, device.type, config.train.ulysses)
    torch.manual_seed(config.seed)
    dataset = make_dataset(config)
    model = GPT(config.gpt_config(dataset.vocab_size)).to(device)
    num_parameters = model.num_parameters()  # before ZeRO-3 partitions them
    nsa = model.config.nsa_config()
    cp = ContextParallelGroup.of_grid(groups, nsa.cp_layout, nsa.select_len)
    if cp.sequence_size > 1:
        use_context_parallel(model, cp.group, cp.ulysses_group)
    ds_config = fill_deepspeed_config(load_deepspeed_json(config.train.deepspeed_config), config, groups.dp)
    loss_scale = sequence_parallel_loss_scale(ds_config, cp.sequence_size)  # ZeRO-3's reduce-scatter averages over S
    if config.train.activation_checkpointing:
        deepspeed.checkpointing.configure(groups, deepspeed_config=ds_config)
        model.checkpoint_blocks = deepspeed.checkpointing.checkpoint
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, config),
                                           config=ds_config, mpu=groups, dist_init_required=False)
    t = config.train
    micro_batch = t.batch_size // (groups.dp * t.grad_accum)
    eval_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    eval_dataset = make_dataset(config, "valid")
    eval_batches = [eval_dataset.sample(micro_batch, config.data.seq_len, eval_gen) for _ in range(t.eval_batches)]
    start_step = _resume(engine, resume, resume_tag) if resume else 0
    initial = _dp_mean(evaluate(engine, eval_batches, device, cp, loss_chunk_tokens=t.loss_chunk_tokens), groups)
    log_path = out / "train_log.jsonl"
    if groups.rank == 0 and start_step == 0 and log_path.exists():
        log_path.unlink()
    history: List[Dict] = []
    tokens_per_step = t.batch_size * config.data.seq_len
    bar = tqdm(range(start_step, t.steps), desc=f"train {model.config.attention} (deepspeed, DP {groups.dp} x CP "
               f"{groups.cp} x U {groups.ulysses})", disable=not (progress and groups.rank == 0), dynamic_ncols=True)
    start = window_start = time.perf_counter()
    window: List[List[float]] = []
    full_selection_steps = model.config.nsa_config().selection_warmup_steps
    for step in bar:
        record, saved = None, None
        set_full_selection(engine, step < full_selection_steps)
        lr = engine.get_lr()[0]  # the rate this step applies (read after the step, DeepSpeed gives the next one's)
        values = []
        for micro in range(t.grad_accum):
            batch = dataset.sample(micro_batch, config.data.seq_len,
                                   batch_generator(config.seed, step, micro, groups.dp_rank))
            loss, _, value = batch_loss(engine, batch, device, cp, loss_chunk_tokens=t.loss_chunk_tokens)
            engine.backward(loss * loss_scale if loss_scale != 1 else loss)
            engine.step()
            values.append(value)
        loss_value, acc_value = _dp_mean({"loss": sum(v[0] for v in values) / len(values),
                                          "accuracy": sum(v[1] for v in values) / len(values)}, groups).values()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step + 1}")
        window.append([loss_value, acc_value])
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            record = {"step": step + 1, "loss": sum(w[0] for w in window) / len(window),
                      "accuracy": sum(w[1] for w in window) / len(window), "lr": lr,
                      "tokens_per_s": len(window) * tokens_per_step / (now - window_start),
                      "step_ms": 1e3 * (now - window_start) / len(window),
                      "peak_memory_mib": _peak_memory_mib(device, groups)}
            history.append(record)
            if groups.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            mem=f"{record['peak_memory_mib']:.0f}MiB")
            window, window_start = [], time.perf_counter()
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < t.steps:
            saved = _save(engine, out, step + 1, config)
        if callback is not None and (record or saved):
            callback(step + 1, record, saved)
    train_time = time.perf_counter() - start
    final = _dp_mean(evaluate(engine, eval_batches, device, cp, loss_chunk_tokens=t.loss_chunk_tokens), groups)
    if save_final:
        saved = _save(engine, out, t.steps, config)
        if callback is not None:
            callback(t.steps, None, saved)
    steps_run = t.steps - start_step
    metrics = {"attention": model.config.attention, "parameters": num_parameters, "backend": "deepspeed",
               "zero_stage": engine.zero_optimization_stage(), "device": str(device), "cp": groups.cp,
               "ulysses": groups.ulysses, "dp": groups.dp, "steps": t.steps, "start_step": start_step,
               "tokens": steps_run * tokens_per_step,
               "train_time_s": train_time, "tokens_per_s": steps_run * tokens_per_step / max(train_time, 1e-9),
               "peak_memory_mib": _peak_memory_mib(device, groups), "initial_eval": initial, "final_eval": final,
               "history": history}
    if groups.rank == 0:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _init_distributed(deepspeed) -> torch.device:
    """torch.distributed from the launcher's environment (NCCL on GPUs, gloo on the CPU); this rank's device.

    ``deepspeed.init_distributed(auto_mpi_discovery=True)`` discovers an ``mpirun`` launch itself: with mpi4py it
    sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (ranks on the same host) and ``MASTER_ADDR`` (rank 0's first
    ``hostname -I`` address), and ``MASTER_PORT`` from ``distributed_port`` (``MASTER_PORT`` or 29500 here). It is
    left to do so when an MPI launcher started this process without ``MASTER_ADDR`` (DeepSpeed would replace a
    given one) and mpi4py's ``COMM_WORLD`` is that job (:func:`nsa_dist.launch.mpi4py_matches_launch`; DeepSpeed
    does not check, and an mpi4py built for another MPI would make every rank a world of one). Every other launch
    (torchrun, deepspeed, Slurm's srun, MPI with ``MASTER_ADDR`` or without mpi4py) is read by
    :func:`nsa_dist.launch.discover_launch` and written back as torch's ``env://`` variables, which leaves
    DeepSpeed nothing to discover. The local rank picks the GPU. Started by no launcher at all
    (``python -m nsa_dist.train ...``), it runs as a single process and says so."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if not launcher_present():
            print("nsa-dist: no distributed launcher (torchrun, deepspeed, mpirun, srun) started this process: "
                  "training as a single process", flush=True)
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        if "MASTER_ADDR" in os.environ or not mpi4py_matches_launch():
            export_torch_env(discover_launch())
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=True,
                                   distributed_port=master_port())
        unlink_cpu_allreduce_buffer()
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def _check_resume(directory: str, tag: Optional[str], steps: int) -> str:
    """The tag to resume from checkpoint directory ``directory``: ``tag`` (``--resume-tag``), else the one its
    ``latest`` file names. Checked on the filesystem, which every rank sees, before any rank builds the model or
    joins a collective, so that all ranks raise the same error: the tag's directory exists (FileNotFoundError
    listing the tags there), every ``*.pt`` file in it is a complete ``torch.save`` archive (ValueError naming the
    file) and its step is below ``train.steps`` = ``steps`` (ValueError naming both)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--resume {directory!r} is not a directory: expected a DeepSpeed checkpoint "
                                f"directory such as <out_dir>/{CHECKPOINT_DIR}")
    tag = checkpoint_tag(root, tag, option="--resume-tag")
    for file in sorted((root / tag).glob("*.pt")):
        try:
            zipfile.ZipFile(file).close()  # reads the central directory at the end: a truncated file has none
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"checkpoint file {file} is not a complete torch.save archive (truncated or corrupt: "
                             f"{exc}); resume from another tag ({available_tags(root)})") from exc
    model_states = model_states_file(root / tag)
    step = load_client_state(model_states).get("step")
    if step is None:
        raise ValueError(f"checkpoint {model_states} records no step: it was not written by train_deepspeed")
    if step >= steps:
        raise ValueError(f"checkpoint {root / tag} is at step {step} but train.steps={steps}: nothing left to "
                         "train; raise train.steps to continue")
    return tag


def _resume(engine, directory: str, tag: str) -> int:
    """Load model, optimizer, scheduler and RNG state (of a tag :func:`_check_resume` checked); return the step
    to continue from. A failing load names the checkpoint (the original error is the cause)."""
    try:
        path, client = engine.load_checkpoint(directory, tag=tag)
    except Exception as exc:
        raise RuntimeError(f"loading DeepSpeed checkpoint {Path(directory) / tag} failed: {exc}") from exc
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint tagged {tag!r} in {directory!r}")
    torch.set_rng_state(client["torch_rng"])
    if torch.cuda.is_available() and client.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(client["cuda_rng"])
    return int(client["step"])


def _save(engine, out: Path, step: int, config: TrainConfig) -> Path:
    """``engine.save_checkpoint`` into ``<out>/checkpoints/step<N>`` with the step and RNG states (every rank), and
    the GPT's config and the training config as plain dicts (``model_config``, ``train_config``, as in the plain
    job's ``checkpoint.pt``; read by ``nsa-dist export-hf``); returns that directory once every rank has written
    its part."""
    client = {"step": step, "torch_rng": torch.get_rng_state(),
              "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
              "model_config": engine.module.config.to_dict(), "train_config": config.to_dict()}
    engine.save_checkpoint(str(out / CHECKPOINT_DIR), tag=f"step{step}", client_state=client)  # ends in a barrier
    return out / CHECKPOINT_DIR / f"step{step}"


def _dp_mean(values: Dict[str, float], groups: ContextDataParallelGroups) -> Dict[str, float]:
    """Mean of per-DP-rank values over the data-parallel group (the CP group already summed its shares)."""
    if groups.dp == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t, group=groups.dp_group)
    return dict(zip(values, (t / groups.dp).tolist()))


def _peak_memory_mib(device: torch.device, groups: ContextDataParallelGroups) -> float:
    """Peak memory of the busiest rank: CUDA max allocated, or the process's max resident set on the CPU."""
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
