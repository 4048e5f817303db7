"""The DeepSpeed backend of the training job on gloo CPU ranks, launched by DeepSpeed's own launcher as README says:
context parallelism under ZeRO-2 and ZeRO-3 equals one process, and a resumed run replays the losses exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("deepspeed")

from nsa_dist.parallel.local_group import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny-cpu.yaml"


def write_job(tmp: Path, name: str, zero_json: str, **train) -> Path:
    """A tiny-cpu YAML (few steps, log every step) using a float32 copy of a shipped ZeRO config.

    The copy turns bf16 off and raises Adam's eps to 1e-2: Adam's first step is about lr * sign(g), so float32
    rounding of a near-zero gradient could flip a weight's update; with a large eps the step is smooth in g."""
    ds = json.loads((REPO / "configs" / "deepspeed" / zero_json).read_text())
    ds["bf16"] = {"enabled": False}
    ds["optimizer"]["params"]["eps"] = 1e-2
    ds_path = tmp / f"{name}.json"
    ds_path.write_text(json.dumps(ds))
    config = yaml.safe_load(TINY.read_text())
    config["out_dir"] = str(tmp / name)
    config["train"].update(dict(steps=1, log_every=1, eval_batches=1, batch_size=4, warmup_steps=1, threads=None,
                                deepspeed_config=str(ds_path)), **train)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_job(config: Path, ranks: int, *args: str) -> dict:
    """``deepspeed --num_gpus ranks --module nsa_dist.train --config config ...`` (on the CPU the launcher starts
    ``ranks`` processes); the metrics rank 0 wrote."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "--module", "nsa_dist.train", "--config", str(config), "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out_dir = Path(yaml.safe_load(config.read_text())["out_dir"])
    return json.loads((out_dir / "metrics.json").read_text())


def fp32_weights(metrics_dir: Path, tag: str) -> dict:
    """Full float32 weights reassembled from a ZeRO checkpoint by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(metrics_dir / "checkpoints"), tag=tag)


def initial_weights(config: Path) -> dict:
    """The model the job starts from (same seed and construction order as the trainer)."""
    from nsa_dist.models import GPT
    from nsa_dist.train import make_dataset
    from nsa_dist.training_config import TrainConfig

    cfg = TrainConfig.load(config)
    torch.manual_seed(cfg.seed)
    dataset = make_dataset(cfg)
    return GPT(cfg.gpt_config(dataset.vocab_size)).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("zero_json,recompute", [("zero2.json", False), ("zero3.json", True)])
def test_training_steps_cp2_equal_cp1(tmp_path, zero_json, recompute):
    # three steps: DeepSpeed's WarmupCosineLR starts its warm-up at lr 0 and the first two steps move nothing here.
    # recompute: the CP run recomputes every block in backward (DeepSpeed's partitioned activation checkpointing,
    # as the shipped JSONs configure it), which must not change a number
    single = run_job(write_job(tmp_path, "cp1", zero_json, cp=1, steps=3), 1)
    split = run_job(write_job(tmp_path, "cp2", zero_json, cp=2, steps=3, activation_checkpointing=recompute), 2)
    assert (single["cp"], single["dp"], split["cp"], split["dp"]) == (1, 1, 2, 1)
    assert split["zero_stage"] == single["zero_stage"] == int(zero_json[4])
    for h1, h2 in zip(single["history"], split["history"], strict=True):
        assert abs(h1["loss"] - h2["loss"]) <= 1e-6 * abs(h1["loss"]), (h1, h2)
    w1, w2 = fp32_weights(tmp_path / "cp1", "step3"), fp32_weights(tmp_path / "cp2", "step3")
    assert set(w1) == set(w2) and len(w1) > 10
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=2e-6, msg=name)
    initial = initial_weights(tmp_path / "cp1.yaml")
    changed = [name for name in w1 if not torch.equal(w1[name], initial[name].float())]
    assert "embed.weight" in changed and len(changed) > len(w1) // 2, changed  # the step did update the model


@pytest.mark.slow
def test_resume_replays_the_same_losses(tmp_path):
    config = write_job(tmp_path, "full", "zero2.json", cp=2, steps=6, save_every=3)
    full = run_job(config, 2)
    resumed_config = tmp_path / "resumed.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["out_dir"] = str(tmp_path / "resumed")
    resumed_config.write_text(yaml.safe_dump(raw))
    resumed = run_job(resumed_config, 2, "--resume", str(tmp_path / "full" / "checkpoints"), "--resume-tag", "step3")
    assert resumed["start_step"] == 3
    assert [h["step"] for h in full["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][3:]]
    assert resumed["final_eval"] == full["final_eval"]
