"""NSA against dense attention (and NSA ablations) trained from scratch on the same data, steps and optimizer.

One invocation trains every combination of the listed tasks, lengths, seeds, learning rates and variants, one after
another on one device or ``--jobs`` at once (each in its own process); each run writes
``<out>/<task>-<seq_len>-<variant>-lr<lr>-s<seed>.json`` (its config, metrics with the evaluation curve, step
time, the device and versions, how many runs shared the device). ``report.py`` turns a folder of them into the
tables and plots.

    # multi-needle retrieval at 16k (one GPU call; the first 480 steps on 1k-token sequences), then ablations
    python benchmarks/quality/experiment.py --task needle --seq-len 16384 --variants nsa dense --steps 1200 \\
        --short-seq-len 1024 --short-steps 480 --out DIR
    python benchmarks/quality/experiment.py --task needle --seq-len 16384 --variants nsa-no-compressed \\
        nsa-no-selected nsa-no-window nsa-mean-pool --steps 1200 --short-seq-len 1024 --short-steps 480 --out DIR
    # byte-level LM on the Python standard library's source (built on the fly)
    python benchmarks/quality/experiment.py --task lm --seq-len 16384 --variants nsa dense --steps 600 --out DIR

The models (``settings.py``): 4 layers, hidden 512, 16 query heads over 4 KV heads, head dim 64, bf16 autocast;
NSA in the paper's geometry (l 32, d 16, l' 64, n 16, w 512). ``--size tiny`` is a CPU smoke-test size.
"""
from __future__ import annotations

import argparse
import datetime
import json
import itertools
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from corpus import build_stdlib_corpus  # noqa: E402
from settings import MODEL_SIZES, TASKS, VARIANTS, train_config  # noqa: E402

from nsa_dist.train import train  # noqa: E402
from nsa_dist.training import TrainConfig  # noqa: E402


def environment() -> Dict[str, str]:
    """Device and library versions recorded with every run."""
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "device": "cpu"}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def run_name(task: str, seq_len: int, variant: str, lr: float, seed: int) -> str:
    """File name of one run's result: ``<task>-<seq_len>-<variant>-lr<lr>-s<seed>.json``."""
    return f"{task}-{seq_len}-{variant}-lr{lr:g}-s{seed}.json"


def train_run(task: str, seq_len: int, variant: str, lr: float, seed: int, *, raw: Dict, size: str,
              corpus: Optional[Dict], out: Path, device: Optional[str], progress: bool, concurrent_runs: int,
              deadline: Optional[float] = None) -> Optional[Dict]:
    """Train one run from its config dictionary ``raw``, write ``out/<run_name>`` and return the result; ``None``
    (and nothing trained) when the wall clock is already past ``deadline`` (``time.time()`` seconds).

    ``concurrent_runs`` (recorded in the result) is the number of runs that shared the device: the report takes
    step times only from runs that had it alone."""
    name = run_name(task, seq_len, variant, lr, seed)
    if deadline is not None and time.time() > deadline:
        print(f"{name}: not started, the time budget is spent", flush=True)
        return None
    metrics = train(TrainConfig.from_dict(raw), device=device, progress=progress, save_checkpoint=False)
    result = {"task": task, "seq_len": seq_len, "variant": variant, "lr": lr, "seed": seed, "size": size,
              "config": raw, "corpus": corpus, "environment": environment(), "concurrent_runs": concurrent_runs,
              "metrics": metrics}
    (out / name).write_text(json.dumps(result, indent=1))
    final = metrics["final_eval"]
    print(f"{task} T={seq_len} {variant} lr {lr:g} seed {seed}: eval loss {final['loss']:.4f}, accuracy "
          f"{final['accuracy']:.4f}, {1e3 * metrics['step_time_s']:.1f} ms/step -> {out / name}", flush=True)
    return result


def run_setting(tasks: Sequence[str], seq_lens: Sequence[int], variants: List[str], *, out: Path, size: str,
                steps: int, tokens_per_step: int, lrs: Sequence[float], seeds: Sequence[int], precision: str,
                device: Optional[str], progress: bool, short_seq_len: Optional[int] = None, short_steps: int = 0,
                done: Sequence[Path] = (), budget_s: Optional[float] = None, jobs: int = 1) -> List[Dict]:
    """Train every (task, length, seed, lr, variant); write and return one result dictionary per finished run.

    A run whose file already exists in ``out`` or in one of the ``done`` folders is skipped (so a call that ran
    out of time resumes where it stopped); no new run starts once ``budget_s`` seconds have passed. ``jobs > 1``
    trains that many runs at once, each in its own process on the same device (more runs per GPU call for a
    small model; their step times are then not comparable and are marked so)."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    deadline = None if budget_s is None else time.time() + budget_s
    with tempfile.TemporaryDirectory() as scratch:
        corpus = build_stdlib_corpus(Path(scratch) / "stdlib.py.txt") if "lm" in tasks else None
        runs = []
        for task, seq_len, seed, lr, variant in itertools.product(tasks, seq_lens, seeds, lrs, variants):
            name = run_name(task, seq_len, variant, lr, seed)
            if any((folder / name).exists() for folder in (out, *done)):
                print(f"{name}: done already, skipped", flush=True)
                continue
            raw = train_config(task, seq_len, variant, size=size, steps=steps, tokens_per_step=tokens_per_step,
                               lr=lr, seed=seed, precision=precision, short_seq_len=short_seq_len,
                               short_steps=short_steps, text_file=corpus["path"] if task == "lm" else None,
                               out_dir=str(Path(scratch) / name[:-len(".json")]))
            runs.append(((task, seq_len, variant, lr, seed),
                         dict(raw=raw, size=size, corpus=corpus if task == "lm" else None, out=out, device=device,
                              progress=progress)))
        concurrent = max(1, min(jobs, len(runs)))
        for _, kwargs in runs:
            kwargs.update(concurrent_runs=concurrent, deadline=deadline)
        if concurrent == 1:
            results = [train_run(*key, **kwargs) for key, kwargs in runs]
        else:
            with ProcessPoolExecutor(max_workers=concurrent, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_train_run_star, runs))
    return [result for result in results if result is not None]


def _train_run_star(run) -> Optional[Dict]:
    """:func:`train_run` of one ``(key, kwargs)`` pair (a picklable function for the process pool)."""
    key, kwargs = run
    return train_run(*key, **kwargs)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", choices=TASKS, required=True, help="tasks (each is a run)")
    parser.add_argument("--seq-len", type=int, nargs="+", required=True, help="sequence lengths (each is a run)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["nsa", "dense"])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--tokens-per-step", type=int, default=32768,
                        help="tokens per optimizer step (sequences per step = this / seq-len)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3], help="learning rates (each is a run)")
    parser.add_argument("--short-seq-len", type=int, help="curriculum: train the first --short-steps steps on "
                        "sequences this long (same tokens per step); evaluation stays at --seq-len")
    parser.add_argument("--short-steps", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (each is a run)")
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", required=True, help="folder for the per-run JSON files")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per run")
    parser.add_argument("--done", type=Path, nargs="*", default=[], help="folders of finished runs to skip")
    parser.add_argument("--budget-s", type=float, help="start no new run after this many seconds")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once on the device, each in its own "
                        "process (their step times are marked as not comparable)")
    args = parser.parse_args(argv)
    run_setting(args.task, args.seq_len, args.variants, out=Path(args.out), size=args.size, steps=args.steps,
                tokens_per_step=args.tokens_per_step, lrs=args.lrs, seeds=args.seeds, precision=args.precision,
                device=args.device, progress=args.progress, short_seq_len=args.short_seq_len,
                short_steps=args.short_steps, done=args.done, budget_s=args.budget_s, jobs=args.jobs)


if __name__ == "__main__":
    main()
