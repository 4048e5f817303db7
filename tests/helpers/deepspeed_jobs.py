"""Tiny DeepSpeed training jobs launched by DeepSpeed's own launcher, shared by the DeepSpeed tests
(tests/deepspeed) and the launcher tests that compare against them (tests/launch)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from nsa_dist.deepspeed.shared_memory import BUFFER_PREFIX, SHARED_MEMORY_DIR
from nsa_dist.launch import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny-cpu.yaml"


def write_job(tmp: Path, name: str, zero_json: str, unclipped: bool = False, **train) -> Path:
    """A tiny-cpu YAML (few steps, log every step) using a float32 copy of a shipped ZeRO config.

    The copy turns bf16 off and raises Adam's eps to 1e-2: Adam's first step is about lr * sign(g), so float32
    rounding of a near-zero gradient could flip a weight's update; with a large eps the step is smooth in g.
    ``unclipped``: gradient clipping off in both (with clipping a gradient scaled by a constant gives the same
    clipped step, so a run that scales the summed gradients wrongly would go unnoticed)."""
    ds = json.loads((REPO / "configs" / "deepspeed" / zero_json).read_text())
    ds["bf16"] = {"enabled": False}
    ds["optimizer"]["params"]["eps"] = 1e-2
    if unclipped:
        ds["gradient_clipping"] = train["grad_clip"] = 0.0
    ds_path = tmp / f"{name}.json"
    ds_path.write_text(json.dumps(ds))
    config = yaml.safe_load(TINY.read_text())
    config["out_dir"] = str(tmp / name)
    config["train"].update(dict(steps=1, log_every=1, eval_batches=1, batch_size=4, warmup_steps=1, threads=None,
                                deepspeed_config=str(ds_path)), **train)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus ranks --module nsa_dist.train --config config ...`` (on the CPU the launcher starts
    ``ranks`` processes), its output captured. The job must leave none of DeepSpeed's CPU all-reduce buffers in
    ``/dev/shm`` (each is 69 MB of RAM that would outlive it; see :mod:`nsa_dist.deepspeed.shared_memory`)."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
           "--module", "nsa_dist.train", "--config", str(config), "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    left = glob.glob(f"{SHARED_MEMORY_DIR}/{BUFFER_PREFIX}_{os.getuid()}_*_{port}_*")
    assert not left, f"the job left DeepSpeed's shared-memory buffers behind: {left}"
    return proc


def run_job(config: Path, ranks: int, *args: str) -> dict:
    """:func:`launch`, which must succeed; the metrics rank 0 wrote."""
    proc = launch(config, ranks, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out_dir = Path(yaml.safe_load(config.read_text())["out_dir"])
    return json.loads((out_dir / "metrics.json").read_text())
