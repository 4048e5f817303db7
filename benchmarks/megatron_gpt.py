"""NSA against Megatron's dense local attention in the Megatron example (examples/megatron/pretrain_gpt_nsa.py).

Each run is one ``torchrun`` of the example with mock data: ``ATTENTION:GPUS:CP:SEQ[:recompute]``, e.g.
``nsa:2:2:32768`` (NSA, 2 GPUs, CP 2, 32k tokens) or ``dense:1:1:16384:recompute``. A run that runs out of memory
is recorded as such (the longest sequence each fits). Prints a markdown table (tokens/s, median step time over the
iterations after the first log interval, peak memory, loss first -> last) and writes it with the raw JSON logs.

    python benchmarks/megatron_gpt.py --runs nsa:2:2:32768 dense:1:1:16384 --iters 20 --out benchmarks/results/megatron
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "megatron", "pretrain_gpt_nsa.py")


@dataclass
class Run:
    """One configuration and what it measured."""

    attention: str
    gpus: int
    cp: int
    seq: int
    recompute: bool
    status: str = "not run"
    tokens_per_s: Optional[float] = None
    step_ms: Optional[float] = None
    peak_memory_mib: Optional[float] = None
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    wall_s: Optional[float] = None

    @classmethod
    def parse(cls, spec: str) -> "Run":
        parts = spec.split(":")
        if len(parts) not in (4, 5) or parts[0] not in ("nsa", "dense") or parts[4:] not in ([], ["recompute"]):
            raise ValueError(f"run {spec!r} is not ATTENTION:GPUS:CP:SEQ[:recompute] with ATTENTION nsa|dense")
        return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]), len(parts) == 5)

    @property
    def name(self) -> str:
        return f"{self.attention}-{self.gpus}gpu-cp{self.cp}-{self.seq}" + ("-recompute" if self.recompute else "")


def model_arguments(args) -> List[str]:
    """The model and training arguments every run shares."""
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads",
            str(args.heads), "--num-query-groups", str(args.query_groups), "--vocab-size", "257",
            "--micro-batch-size", "1", "--global-batch-size", str(args.global_batch), "--train-iters",
            str(args.iters), "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "2", "--log-interval", "1",
            "--bf16", "--use-distributed-optimizer"]


def execute(run: Run, args) -> Run:
    """Run the example once; fill ``run`` from its JSON log (or mark it OOM / failed)."""
    log = os.path.join(args.out, f"{run.name}.jsonl")
    if os.path.exists(log):
        os.remove(log)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(run.gpus), "--master-port",
           str(args.port), EXAMPLE, "--attention", run.attention, "--context-parallel-size", str(run.cp),
           "--seq-length", str(run.seq), "--json-log", log, *model_arguments(args)]
    if run.recompute:
        cmd.append("--recompute-activations")
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, code = f"{err.stdout or ''}{err.stderr or ''}", "timeout"
    run.wall_s = time.time() - start
    with open(os.path.join(args.out, f"{run.name}.log"), "w") as f:
        f.write(output if isinstance(output, str) else output.decode())
    if code != 0:
        run.status = "OOM" if "OutOfMemoryError" in str(output) or "out of memory" in str(output) else f"failed ({code})"
        return run
    records = [json.loads(line) for line in open(log)]
    steady = records[1:] or records
    run.status = "ok"
    run.tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    run.step_ms = statistics.median(r["step_ms"] for r in steady)
    run.peak_memory_mib = max(r["peak_memory_mib"] for r in records)
    run.first_loss, run.last_loss = records[0]["loss"], records[-1]["loss"]
    return run


def table(runs: List[Run]) -> str:
    """Markdown table of the runs."""
    head = ("| attention | GPUs | CP | seq | recompute | status | tokens/s | step ms | peak MiB/GPU | loss first -> last |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in runs:
        fmt = (lambda v, f: "-" if v is None else format(v, f))
        loss = "-" if r.first_loss is None else f"{r.first_loss:.3f} -> {r.last_loss:.3f}"
        rows.append(f"| {r.attention} | {r.gpus} | {r.cp} | {r.seq} | {'yes' if r.recompute else 'no'} | {r.status} | "
                    f"{fmt(r.tokens_per_s, ',.0f')} | {fmt(r.step_ms, '.1f')} | {fmt(r.peak_memory_mib, ',.0f')} | "
                    f"{loss} |")
    return head + "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="ATTENTION:GPUS:CP:SEQ[:recompute] ...")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--query-groups", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    p.add_argument("--port", type=int, default=29513)
    p.add_argument("--out", default="benchmarks/results/megatron")
    args = p.parse_args(argv)
    runs = [Run.parse(spec) for spec in args.runs]
    os.makedirs(args.out, exist_ok=True)
    for run in runs:
        execute(run, args)
        print(f"{run.name}: {run.status} {run.tokens_per_s} tok/s, {run.peak_memory_mib} MiB, "
              f"{run.wall_s:.0f} s", flush=True)
    text = table(runs)
    print(text)
    with open(os.path.join(args.out, "table.md"), "a") as f:
        f.write(text + "\n\n")
    with open(os.path.join(args.out, "runs.json"), "a") as f:
        f.write(json.dumps({"args": vars(args), "runs": [asdict(r) for r in runs]}) + "\n")


if __name__ == "__main__":
    main()
