"""``nsa-dist train --cp 2``: the same losses as one process, step by step; bad CP configurations are refused."""
import json

import pytest
import yaml

from nsa_dist.cli import main
from nsa_dist.training import TrainConfig

pytestmark = pytest.mark.slow  # spawns gloo process groups


def write_config(tmp_path, **train):
    """tiny-cpu shortened: 3 steps at full learning rate (parameters really move), loss logged every step."""
    raw = TrainConfig.load("configs/train/tiny-cpu.yaml").to_dict()
    raw["train"].update(steps=3, log_every=1, warmup_steps=1, batch_size=4, eval_batches=1, **train)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cp2_training_losses_equal_cp1(tmp_path):
    config = write_config(tmp_path)
    for cp in (1, 2):
        main(["train", "--config", str(config), "--cp", str(cp), "--out-dir", str(tmp_path / f"cp{cp}"),
              "--no-progress", "--seed", "5"])
    one, two = (json.loads((tmp_path / f"cp{cp}" / "metrics.json").read_text()) for cp in (1, 2))
    assert one["cp"] == 1 and two["cp"] == 2 and two["tokens_per_s"] > 0
    losses = [(a["loss"], b["loss"]) for a, b in zip(one["history"], two["history"])]
    losses += [(one[k]["loss"], two[k]["loss"]) for k in ("initial_eval", "final_eval")]
    assert len(losses) == 5 and losses[0][0] != losses[-1][0]  # the steps changed the model
    for a, b in losses:
        assert abs(a - b) <= 1e-5, f"CP=1 vs CP=2 losses {losses}"
    assert (tmp_path / "cp2" / "checkpoint.pt").is_file()


def test_cp_configurations_are_checked(tmp_path):
    raw = TrainConfig.load("configs/train/tiny-cpu.yaml").to_dict()
    dense = TrainConfig.from_dict({**raw, "model": {**raw["model"], "attention": "dense"},
                                   "train": {**raw["train"], "cp": 2}})  # dense attention is context-parallel too
    assert dense.train.cp == 2 and dense.model["attention"] == "dense"
    with pytest.raises(ValueError, match=r"T=204 is not divisible into 2P=8 chunks"):
        TrainConfig.from_dict({**raw, "data": {**raw["data"], "seq_len": 204}, "train": {**raw["train"], "cp": 4}})
    with pytest.raises(ValueError, match=r"chunk length 20 \(T=160 in 8 chunks.*l'=32"):
        TrainConfig.from_dict({**raw, "data": {**raw["data"], "seq_len": 160}, "train": {**raw["train"], "cp": 4}})
    with pytest.raises(ValueError, match=r"train.cp must be a positive int, got 0"):
        TrainConfig.from_dict({**raw, "train": {**raw["train"], "cp": 0}})
