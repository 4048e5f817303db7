"""The DeepSpeed backend of the training job on gloo CPU ranks, launched by DeepSpeed's own launcher as README says:
context parallelism under ZeRO-2 and ZeRO-3 equals one process, a resumed run replays the losses exactly, and a
checkpoint that cannot be resumed (at or past train.steps, a missing tag, a truncated file) is an error naming it,
raised before anything distributed starts."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

pytest.importorskip("deepspeed")

from tests.helpers.deepspeed_jobs import launch, run_job, write_job  # noqa: E402

pytestmark = pytest.mark.slow  # DeepSpeed training runs


def fp32_weights(metrics_dir: Path, tag: str) -> dict:
    """Full float32 weights reassembled from a ZeRO checkpoint by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(metrics_dir / "checkpoints"), tag=tag)


def initial_weights(config: Path) -> dict:
    """The model the job starts from (same seed and construction order as the trainer)."""
    from nsa_dist.models import GPT
    from nsa_dist.training.data import make_dataset
    from nsa_dist.training import TrainConfig

    cfg = TrainConfig.load(config)
    torch.manual_seed(cfg.seed)
    dataset = make_dataset(cfg)
    return GPT(cfg.gpt_config(dataset.vocab_size)).state_dict()


@pytest.mark.parametrize("zero_json,recompute", [("zero2.json", False), ("zero3.json", True)])
def test_training_steps_cp2_equal_cp1(tmp_path, zero_json, recompute):
    # three steps: DeepSpeed's WarmupCosineLR starts its warm-up at lr 0 and the first two steps move nothing here.
    # recompute: the CP run recomputes every block in backward (DeepSpeed's partitioned activation checkpointing,
    # as the shipped JSONs configure it), which must not change a number. Unclipped, so a gradient off by a constant
    # factor (ZeRO-3's reduce-scatter averaging over the CP ranks without the job's loss factor) shows.
    single = run_job(write_job(tmp_path, "cp1", zero_json, unclipped=True, cp=1, steps=3), 1)
    split = run_job(write_job(tmp_path, "cp2", zero_json, unclipped=True, cp=2, steps=3,
                              activation_checkpointing=recompute), 2)
    assert (single["cp"], single["dp"], split["cp"], split["dp"]) == (1, 1, 2, 1)
    assert_same_steps(tmp_path, zero_json, single, split, "cp2")


def assert_same_steps(tmp_path: Path, zero_json: str, single: dict, split: dict, split_name: str) -> None:
    """The 3-step run ``split_name`` took the single process's (``cp1``) steps: same losses, same weights at step 3,
    and the steps did change the model."""
    assert split["zero_stage"] == single["zero_stage"] == int(zero_json[4])
    for h1, h2 in zip(single["history"], split["history"], strict=True):
        assert abs(h1["loss"] - h2["loss"]) <= 1e-6 * abs(h1["loss"]), (h1, h2)
    w1, w2 = fp32_weights(tmp_path / "cp1", "step3"), fp32_weights(tmp_path / split_name, "step3")
    assert set(w1) == set(w2) and len(w1) > 10
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=2e-6, msg=name)
    initial = initial_weights(tmp_path / "cp1.yaml")
    changed = [name for name in w1 if not torch.equal(w1[name], initial[name].float())]
    assert "embed.weight" in changed and len(changed) > len(w1) // 2, changed  # the step did update the model


@pytest.mark.parametrize("zero_json", ["zero2.json", "zero3.json"])
def test_training_steps_ulysses2_inside_cp2_equal_cp1(tmp_path, zero_json):
    """U 2 inside CP 2 (4 ranks of the DP x CP x U grid, one sequence group): the gradients of the ranks sharing
    each sequence (the mpu's sequence-parallel group) are summed and the steps equal one process's, under ZeRO-2 and
    under ZeRO-3 (whose reduce-scatter averages over the group, undone by the job's loss factor). Without gradient
    clipping, so a wrong scale of the sum would show (clipped to norm 1, a gradient scaled by a constant takes the
    same step)."""
    single = run_job(write_job(tmp_path, "cp1", zero_json, unclipped=True, cp=1, steps=3), 1)
    split = run_job(write_job(tmp_path, "cp2u2", zero_json, unclipped=True, cp=2, ulysses=2, steps=3), 4)
    assert (split["cp"], split["ulysses"], split["dp"]) == (2, 2, 1)
    assert_same_steps(tmp_path, zero_json, single, split, "cp2u2")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A 6-step CP 2 run under ZeRO-2 saving checkpoints at steps 3 and 6: its YAML and metrics."""
    config = write_job(tmp_path_factory.mktemp("full"), "full", "zero2.json", cp=2, steps=6, save_every=3)
    return config, run_job(config, 2)


def checkpoints_of(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["out_dir"]) / "checkpoints"


def test_resume_replays_the_same_losses(tmp_path, full_run):
    config, full = full_run
    resumed_config = tmp_path / "resumed.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["out_dir"] = str(tmp_path / "resumed")
    resumed_config.write_text(yaml.safe_dump(raw))
    resumed = run_job(resumed_config, 2, "--resume", str(checkpoints_of(config)), "--resume-tag", "step3")
    assert resumed["start_step"] == 3
    assert [h["step"] for h in full["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][3:]]
    assert resumed["final_eval"] == full["final_eval"]


def test_unresumable_checkpoints_are_errors_naming_them(tmp_path, full_run):
    """Every check reads only the filesystem and runs before the process group exists, so every rank raises the
    same error: checked in this process (no process group ever starts) and once through the launcher."""
    from nsa_dist.training import train_deepspeed
    from nsa_dist.training import TrainConfig

    config, _ = full_run
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(checkpoints_of(config), checkpoints)  # latest: step6

    def resume(tag=None, steps=6):
        raw = TrainConfig.load(config).to_dict()
        raw["train"]["steps"] = steps
        train_deepspeed(TrainConfig.from_dict(raw), progress=False, resume=str(checkpoints), resume_tag=tag)

    past_end = f"checkpoint {checkpoints / 'step6'} is at step 6 but train.steps=6: nothing left to train; " \
               "raise train.steps to continue"
    proc = launch(config, 2, "--resume", str(checkpoints))
    assert proc.returncode != 0 and past_end in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    with pytest.raises(ValueError, match=re.escape("is at step 3 but train.steps=2")):
        resume("step3", steps=2)
    with pytest.raises(FileNotFoundError) as missing:
        resume("step7", steps=10)
    assert str(missing.value) == (f"--resume-tag 'step7' but {str(checkpoints)!r} has no such checkpoint "
                                  "(available tags: step3, step6)")
    for file in sorted((checkpoints / "step3").glob("*.pt")):  # the model states and the ZeRO optimizer states
        whole = file.read_bytes()
        file.write_bytes(whole[:len(whole) // 2])
        with pytest.raises(ValueError, match=re.escape(f"checkpoint file {file} is not a complete torch.save archive")):
            resume("step3")
        file.write_bytes(whole)
    shutil.rmtree(checkpoints / "step6")
    with pytest.raises(FileNotFoundError) as deleted:
        resume()
    assert str(deleted.value) == (f"the 'latest' file of {str(checkpoints)!r} names tag 'step6' but "
                                  f"{str(checkpoints)!r} has no such checkpoint (available tags: step3)")
    assert not dist.is_initialized()


def test_unwritable_out_dir_fails_before_deepspeed_starts(tmp_path):
    """An out_dir that cannot be written is an error naming it on every rank, before the process group starts
    and before step 1 (not after training, losing the run)."""
    from nsa_dist.training import train_deepspeed
    from nsa_dist.training import TrainConfig

    (tmp_path / "a-file").write_text("x")
    raw = TrainConfig.load(write_job(tmp_path, "job", "zero2.json")).to_dict()
    raw["out_dir"] = str(tmp_path / "a-file" / "runs")
    with pytest.raises(ValueError, match=re.escape(f"out_dir={raw['out_dir']!r} is not writable")):
        train_deepspeed(TrainConfig.from_dict(raw), progress=False)
    assert not dist.is_initialized()
