"""NSA against dense attention in the DeepSpeed backend of the training job, same model and ZeRO config.

Each run is one ``deepspeed --num_gpus G --module nsa_dist.train`` of a training YAML with overrides
``ATTENTION:SEQ[:STEPS]`` (dense attention runs context-parallel with an all-gather of K/V; NSA exchanges
compressed tokens and selected blocks). A run that fails (e.g. out of memory) is recorded with its reason. Prints a
markdown table (tokens/s and step time as medians over the steps after the first, peak memory per GPU, loss of
the first and last step) and appends it with the raw metrics to ``--out``.

    python benchmarks/deepspeed_gpt.py --config configs/train/gpt-1b-128k-cp2.yaml --gpus 2 \\
        --runs nsa:131072 dense:131072:10 --out benchmarks/results/deepspeed
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from nsa_dist.yaml_loader import load_yaml_mapping


def run(args, attention: str, seq: int, steps: int) -> dict:
    """One training job; its metrics.json plus ``status``, or the failure."""
    name = f"{attention}-{seq}"
    out = Path(args.out) / name
    raw = load_yaml_mapping(args.config)
    raw["model"]["attention"] = attention
    raw["data"]["seq_len"] = seq
    raw["train"]["steps"] = steps
    raw["out_dir"] = str(out)
    config = Path(args.out) / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.gpus), "--master_port",
           str(args.port), "--module", "nsa_dist.train", "--config", str(config), "--no-progress", "--no-checkpoint"]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        log, code = str(err.stdout or "") + str(err.stderr or ""), "timeout"
    (Path(args.out) / f"{name}.log").write_text(log)
    result = {"attention": attention, "seq": seq, "steps": steps, "wall_s": time.time() - start}
    if code != 0:
        oom = "OutOfMemoryError" in log or "out of memory" in log
        return {**result, "status": "OOM" if oom else f"failed ({code})"}
    metrics = json.loads((out / "metrics.json").read_text())
    steady = metrics["history"][1:] or metrics["history"]
    return {**result, "status": "ok", "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steady),
            "step_ms": statistics.median(h["step_ms"] for h in steady), "peak_memory_mib": metrics["peak_memory_mib"],
            "first_loss": metrics["history"][0]["loss"], "last_loss": metrics["history"][-1]["loss"],
            "parameters": metrics["parameters"], "zero_stage": metrics["zero_stage"], "cp": metrics["cp"],
            "dp": metrics["dp"]}


def table(results) -> str:
    """Markdown table of the runs."""
    lines = ["| attention | seq | steps | status | tokens/s | step ms | peak MiB/GPU | loss first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['attention']} | {r['seq']} | {r['steps']} | {r['status']} | - | - | - | - |")
            continue
        lines.append(f"| {r['attention']} | {r['seq']} | {r['steps']} | ok | {r['tokens_per_s']:,.0f} | "
                     f"{r['step_ms']:.0f} | {r['peak_memory_mib']:,.0f} | {r['first_loss']:.3f} -> "
                     f"{r['last_loss']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training YAML naming a DeepSpeed config")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--runs", nargs="+", required=True, help="ATTENTION:SEQ[:STEPS] (steps default: the YAML's)")
    p.add_argument("--timeout", type=float, default=400, help="seconds per run")
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--out", default="benchmarks/results/deepspeed")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    default_steps = load_yaml_mapping(args.config)["train"]["steps"]
    results = []
    for spec in args.runs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("nsa", "dense"):
            raise ValueError(f"run {spec!r} is not ATTENTION:SEQ[:STEPS] with ATTENTION nsa|dense")
        results.append(run(args, parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else default_steps))
        print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(text)
    with open(Path(args.out) / "runs.jsonl", "a") as f:
        f.write(json.dumps({"config": args.config, "gpus": args.gpus, "runs": results}) + "\n")
    with open(Path(args.out) / "table.md", "a") as f:
        f.write(text + "\n\n")


if __name__ == "__main__":
    main()
