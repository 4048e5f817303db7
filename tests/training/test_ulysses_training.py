"""``train.ulysses``: the plain backend on ``CP x U`` local ranks takes the same steps as one process, and the training
config refuses sequence-parallel settings that do not split the heads or the sequence (or need packed documents it
does not feed), naming the settings and values."""
import json

import pytest
import yaml

from nsa_dist.cli import main
from nsa_dist.training import TrainConfig

TINY = "configs/train/tiny-cpu.yaml"


def raw_config(**train):
    raw = TrainConfig.load(TINY).to_dict()
    raw["train"].update(**train)
    return raw


@pytest.mark.slow  # spawns gloo process groups
def test_ulysses_training_losses_equal_one_process(tmp_path):
    """3 steps at full learning rate: U = 2 alone (set by ``--ulysses``) and U = 2 inside CP = 2 (set in the YAML) give
    the single process's losses."""
    raw = raw_config(steps=3, log_every=1, warmup_steps=1, batch_size=4, eval_batches=1)
    runs = {"single": (dict(cp=1, ulysses=1), []), "u2": (dict(cp=1, ulysses=1), ["--ulysses", "2"]),
            "cp2u2": (dict(cp=2, ulysses=2), [])}
    metrics = {}
    for name, (sizes, flags) in runs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], **sizes}}))
        main(["train", "--config", str(path), "--out-dir", str(tmp_path / name), "--no-progress", "--seed", "5"]
             + flags)
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert [(m["cp"], m["ulysses"]) for m in metrics.values()] == [(1, 1), (1, 2), (2, 2)]
    single = metrics.pop("single")
    reference = [h["loss"] for h in single["history"]] + [single[k]["loss"] for k in ("initial_eval", "final_eval")]
    assert len(reference) == 5 and reference[0] != reference[2]  # the steps changed the model
    for name, m in metrics.items():
        losses = [h["loss"] for h in m["history"]] + [m[k]["loss"] for k in ("initial_eval", "final_eval")]
        assert max(abs(a - b) for a, b in zip(reference, losses, strict=True)) <= 1e-5, (name, reference, losses)
        assert (tmp_path / name / "checkpoint.pt").is_file()


def test_ulysses_sizes_are_accepted():
    assert TrainConfig.from_dict(raw_config(cp=2, ulysses=2)).train.ulysses == 2
    assert TrainConfig.from_dict(raw_config(cp=1, ulysses=4)).train.ulysses == 4  # 2 KV heads, each on 2 ranks


@pytest.mark.parametrize("model, data, train, words", [
    ({}, {}, dict(ulysses=0), ["train.ulysses must be a positive int, got 0"]),
    ({}, {}, dict(ulysses=1.5), ["train.ulysses must be a positive int, got 1.5"]),
    ({}, {}, dict(cp=1, ulysses=3), ["train.ulysses=3 must divide num_heads=4"]),
    (dict(num_heads=6, num_kv_heads=3, head_dim=16), {}, dict(cp=1, ulysses=2),
     ["train.ulysses=2 and num_kv_heads=3", "one must divide the other"]),
    ({}, dict(seq_len=250), dict(cp=1, ulysses=4),
     ["data.seq_len=250 does not split over train.cp=1 x train.ulysses=4", "multiple of train.ulysses=4"]),
    (dict(num_heads=6, num_kv_heads=3, head_dim=16), dict(seq_len=256), dict(cp=2, ulysses=3),
     ["data.seq_len=256 does not split over train.cp=2 x train.ulysses=3", "shard of 128 tokens"]),
    (dict(attention="dense"), {}, dict(cp=1, ulysses=2),
     ["train.ulysses=2 applies to NSA attention only", "model.attention='dense'"]),
    (dict(nsa=dict(selection_loss_weight=0.1, selection_scoring="compressed", selection_warmup_steps=0)), {},
     dict(cp=1, ulysses=2), ["model.nsa.selection_loss_weight=0.1 is not supported", "train.ulysses=2"]),
    (dict(nsa=dict(cp_layout="per_document")), {}, dict(cp=2, ulysses=1),
     ["model.nsa.cp_layout='per_document' needs packed documents", "data.seq_len=256", "'zigzag'"]),
], ids=["zero", "float", "heads", "kv-heads", "length", "cp-shard", "dense", "selection-loss", "per-document"])
def test_bad_ulysses_settings_are_refused(model, data, train, words):
    raw = raw_config(**train)
    raw["model"] = {**raw["model"], **model, "nsa": {**raw["model"]["nsa"], **model.get("nsa", {})}}
    raw["data"] = {**raw["data"], **data}
    with pytest.raises(ValueError) as err:
        TrainConfig.from_dict(raw)
    assert all(w in str(err.value) for w in words), str(err.value)
