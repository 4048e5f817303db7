"""The shipped DeepSpeed JSONs (configs/deepspeed) and training YAMLs (configs/train).

Every YAML loads (model, data and CP layout validated); every (JSON, YAML) pair the repository ships (each JSON
with tiny-cpu.yaml, and each YAML with the JSON it names) is completed by ``fill_deepspeed_config`` for ``DP =
world / CP`` ranks and then parsed by DeepSpeed's own ``DeepSpeedConfig`` with an ``mpu`` of that size, which
checks ``train_batch_size == micro * grad_accum * DP``, the ZeRO section (unknown keys rejected) and reads every key
the JSON sets; the filled optimizer and scheduler blocks build DeepSpeed's ``WarmupCosineLR`` with the YAML's
schedule. ``fill_deepspeed_config``'s errors name the disagreeing values.
"""
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402
from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys  # noqa: E402
from deepspeed.runtime.lr_schedules import WarmupCosineLR  # noqa: E402

from nsa_dist.deepspeed import fill_deepspeed_config, load_deepspeed_json  # noqa: E402
from nsa_dist.training import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DS_JSONS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
TRAIN_YAMLS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
TINY = ROOT / "configs" / "train" / "tiny-cpu.yaml"
# keys the training YAML owns: a shipped JSON leaves them to fill_deepspeed_config
YAML_OWNED = [("train_batch_size",), ("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",),
              ("sequence_parallel_size",), ("optimizer", "params", "lr"), ("scheduler", "params", "total_num_steps"),
              ("scheduler", "params", "warmup_num_steps"), ("scheduler", "params", "cos_min_ratio")]
DP_SIZES = (1, 2)  # world = DP * CP: one or two copies of the CP group


def _named_json(yaml_path: Path):
    """The DeepSpeed JSON a training YAML names (read without validation, so collection never fails)."""
    named = ((yaml.safe_load(yaml_path.read_text()) or {}).get("train") or {}).get("deepspeed_config")
    return ROOT / named if named else None


def _pairs():
    pairs = [pytest.param(j, TINY, id=f"{j.name}+{TINY.name}") for j in DS_JSONS]
    for y in TRAIN_YAMLS:
        j = _named_json(y)
        if j is not None:
            pairs.append(pytest.param(j, y, id=f"{j.name}+{y.name}"))
    return pairs


class StaticGroups:
    """DeepSpeed's ``mpu`` interface as :class:`nsa_dist.deepspeed.ContextDataParallelGroups` answers it for ``DP x
    CP x U`` ranks (rank 0's view; ``cp`` here is the ``CP * U`` ranks sharing a sequence), without process groups:
    ``DeepSpeedConfig`` reads only the sizes."""

    def __init__(self, dp: int, cp: int):
        self.dp, self.cp = dp, cp

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return self.dp

    def get_sequence_parallel_rank(self):
        return 0

    def get_sequence_parallel_world_size(self):
        return self.cp

    def get_sequence_data_parallel_rank(self):
        return 0

    def get_sequence_data_parallel_world_size(self):
        return self.dp * self.cp


@pytest.fixture
def ds_rank0(monkeypatch):
    """``DeepSpeedConfig`` asks ``deepspeed.comm.get_rank()`` before it reads the mpu and, without an initialised
    process group, falls back to a world of 1 ignoring the mpu; answer rank 0 so the mpu's DP size is used."""
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)


def _get(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _assert_read(expected, got, where):
    """Every value the JSON sets under ``where`` is what DeepSpeed parsed (a misspelt key would read a default)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), f"{where}: DeepSpeed parsed {got!r}, the JSON has {expected!r}"
        for key, value in expected.items():
            assert key in got, f"DeepSpeed did not read {where}.{key}"
            _assert_read(value, got[key], f"{where}.{key}")
    else:
        assert got == expected, f"{where}: DeepSpeed parsed {got!r}, the JSON has {expected!r}"


def _check_parsed(parsed: DeepSpeedConfig, ds: dict, filled: dict, config: TrainConfig, dp: int) -> None:
    """``parsed`` (DeepSpeed's view of ``filled``) has the YAML's batch arithmetic and schedule and every key of the
    shipped JSON ``ds``."""
    t = config.train
    assert parsed.world_size == dp
    assert parsed.train_batch_size == t.batch_size
    assert parsed.gradient_accumulation_steps == t.grad_accum
    assert parsed.train_micro_batch_size_per_gpu == t.batch_size // (dp * t.grad_accum)
    assert parsed.train_micro_batch_size_per_gpu * t.grad_accum * dp == t.batch_size
    assert parsed.gradient_clipping == t.grad_clip
    assert parsed.optimizer_name == "adamw" and parsed.optimizer_params["lr"] == t.lr
    assert parsed.scheduler_name == "WarmupCosineLR"
    assert parsed.scheduler_params == filled["scheduler"]["params"]
    readers = {
        "bf16": lambda: {"enabled": parsed.bfloat16_config.enabled},
        "zero_optimization": lambda: parsed.zero_config.model_dump(by_alias=True),
        "gradient_clipping": lambda: parsed.gradient_clipping,
        "activation_checkpointing": lambda: vars(parsed.activation_checkpointing_config),
        "optimizer": lambda: {"type": filled["optimizer"]["type"], "params": parsed.optimizer_params},
        "scheduler": lambda: {"type": parsed.scheduler_name, "params": parsed.scheduler_params},
        "steps_per_print": lambda: parsed.steps_per_print,
        "wall_clock_breakdown": lambda: parsed.wall_clock_breakdown,
    }
    unchecked = sorted(set(ds) - set(readers))
    assert not unchecked, f"top-level keys {unchecked}: add how DeepSpeedConfig exposes them to this test"
    for key, read in readers.items():
        if key in ds:
            _assert_read(ds[key], read(), key)


def test_shipped_files_are_found():
    assert {p.name for p in DS_JSONS} >= {"zero1.json", "zero2.json", "zero3.json", "zero3-offload.json"}
    assert {p.name for p in TRAIN_YAMLS} >= {"tiny-cpu.yaml", "small-gpu-32k.yaml", "gpt-1b-128k-cp2.yaml",
                                             "gpt-1b-128k-cp8.yaml"}


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: p.name)
def test_training_yaml_loads(path):
    """Every training YAML loads (model, data, CP layout checked), is documented at the top, and the DeepSpeed
    JSON it names exists."""
    assert path.read_text().startswith("#"), f"{path.name} has no comment block at the top"
    config = TrainConfig.load(path)
    if config.train.deepspeed_config:
        assert (ROOT / config.train.deepspeed_config).is_file(), config.train.deepspeed_config


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_json_leaves_yaml_keys_to_the_yaml(path):
    """Strict JSON without duplicate keys (DeepSpeed's own loader rejects those) that sets none of the keys the
    YAML owns."""
    ds = load_deepspeed_json(path)
    assert json.loads(path.read_text(), object_pairs_hook=dict_raise_error_on_duplicate_keys) == ds
    owned = [".".join(key) for key in YAML_OWNED if _get(ds, key) is not None]
    assert not owned, f"{path.name} sets {owned}: the training YAML owns them"
    assert ds["bf16"]["enabled"] is True and ds["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("json_path, yaml_path", _pairs())
def test_pair_accepted_by_deepspeed(json_path, yaml_path, ds_rank0):
    """Filled for DP in {1, 2} (where the batch divides), DeepSpeed accepts the pair with the YAML's batch
    arithmetic and reads back every key of the JSON; the JSON itself is not modified."""
    config = TrainConfig.load(yaml_path)
    ds = load_deepspeed_json(json_path)
    t = config.train
    dps = [dp for dp in DP_SIZES if t.batch_size % (dp * t.grad_accum) == 0]
    assert dps, f"{yaml_path.name}: train.batch_size={t.batch_size} fits no DP in {DP_SIZES}"
    for dp in dps:
        filled = fill_deepspeed_config(ds, config, dp)
        parsed = DeepSpeedConfig(filled, mpu=StaticGroups(dp, t.cp * t.ulysses))
        _check_parsed(parsed, ds, filled, config, dp)
    assert ds == load_deepspeed_json(json_path), "fill_deepspeed_config changed its input"


@pytest.mark.parametrize("json_path, yaml_path", _pairs())
def test_filled_schedule_builds_deepspeed_scheduler(json_path, yaml_path):
    """The filled optimizer block builds the AdamW DeepSpeed's engine makes of it (``torch_adam``) and the
    WarmupCosineLR it drives follows the YAML: linear warm-up from 0 to ``lr``, cosine down to ``min_lr_ratio *
    lr`` at the last step."""
    config = TrainConfig.load(yaml_path)
    t = config.train
    filled = fill_deepspeed_config(load_deepspeed_json(json_path), config, dp=1)
    params = dict(filled["optimizer"]["params"])
    assert params.pop("torch_adam") is True
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **params)
    scheduler = WarmupCosineLR(optimizer, **filled["scheduler"]["params"])
    warmup = max(2, t.warmup_steps)  # DeepSpeed's floor
    checkpoints = [(0, 0.0), (warmup // 2, t.lr * (warmup // 2) / warmup), (warmup - 1, t.lr * (warmup - 1) / warmup),
                   (t.steps - 1, t.min_lr_ratio * t.lr)]
    for step, expected in checkpoints:
        scheduler.step(step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), (step, expected)


def test_deepspeed_checks_the_batch_against_the_mpu(ds_rank0):
    """The validation above can fail: a JSON filled for DP 1 does not pass DeepSpeed with an mpu of DP 2."""
    config = TrainConfig.load(TINY)
    filled = fill_deepspeed_config(load_deepspeed_json(DS_JSONS[0]), config, dp=1)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        DeepSpeedConfig(filled, mpu=StaticGroups(2, config.train.cp))


@pytest.mark.parametrize("path, wrong, source", [
    (("optimizer", "params", "lr"), lambda t: t.lr * 2, "train.lr"),
    (("optimizer", "params", "betas"), lambda t: [t.betas[0], 0.999], "train.betas"),
    (("optimizer", "params", "weight_decay"), lambda t: t.weight_decay + 0.05, "train.weight_decay"),
    (("gradient_clipping",), lambda t: t.grad_clip / 2, "train.grad_clip"),
    (("train_batch_size",), lambda t: t.batch_size * 2, "train.batch_size"),
    (("scheduler", "params", "total_num_steps"), lambda t: t.steps + 1, "train.steps"),
], ids=lambda v: ".".join(v) if isinstance(v, tuple) else None)
def test_disagreeing_json_is_refused_naming_both(path, wrong, source):
    config = TrainConfig.load(TINY)
    ds = copy.deepcopy(load_deepspeed_json(DS_JSONS[0]))
    parent = ds
    for key in path[:-1]:
        parent = parent[key]
    bad = wrong(config.train)
    parent[path[-1]] = bad
    yaml_value = _get(fill_deepspeed_config(load_deepspeed_json(DS_JSONS[0]), config, dp=1), path)
    with pytest.raises(ValueError) as err:
        fill_deepspeed_config(ds, config, dp=1)
    message = str(err.value)
    assert f"{'.'.join(path)}={bad!r}" in message and f"{source}={yaml_value!r}" in message, message


@pytest.mark.parametrize("dp, grad_accum", [(3, 1), (1, 3), (2, 3)])
def test_indivisible_batch_is_refused_naming_the_numbers(dp, grad_accum):
    raw = TrainConfig.load(TINY).to_dict()
    raw["train"]["grad_accum"] = grad_accum
    config = TrainConfig.from_dict(raw)
    batch = config.train.batch_size
    assert batch % (dp * grad_accum), "the case must be indivisible"
    with pytest.raises(ValueError) as err:
        fill_deepspeed_config(load_deepspeed_json(DS_JSONS[0]), config, dp=dp)
    message = str(err.value)
    assert f"train.batch_size={batch}" in message and f"{dp} * {grad_accum}" in message, message


@pytest.mark.parametrize("cp, ulysses", [(1, 2), (2, 2), (2, 1)])
def test_sequence_parallel_size_is_the_ranks_sharing_a_sequence(cp, ulysses, ds_rank0, monkeypatch):
    """``sequence_parallel_size`` is filled with ``train.cp * train.ulysses``: the ranks sharing one sequence, as
    DeepSpeed means it. Without an mpu DeepSpeed derives ``DP = world / sequence_parallel_size`` from it and checks
    the batch against that DP, so an 8-rank world gives the same batch arithmetic as nsa-dist's mpu."""
    raw = TrainConfig.load(TINY).to_dict()
    raw["train"].update(cp=cp, ulysses=ulysses)
    config = TrainConfig.from_dict(raw)
    dp = 8 // (cp * ulysses)
    filled = fill_deepspeed_config(load_deepspeed_json(DS_JSONS[0]), config, dp=dp)
    assert filled["sequence_parallel_size"] == cp * ulysses
    assert DeepSpeedConfig(filled, mpu=StaticGroups(dp, cp * ulysses)).world_size == dp
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda group=None: 8)
    without_mpu = DeepSpeedConfig(filled)
    assert without_mpu.world_size == dp
    assert without_mpu.train_micro_batch_size_per_gpu * config.train.grad_accum * dp == config.train.batch_size


def test_json_with_the_ulysses_size_alone_is_refused_under_cp():
    """A JSON that sets ``sequence_parallel_size`` to the Ulysses size (as a DeepSpeed-only job would) disagrees
    with CP 2 x U 2: the error names both values."""
    raw = TrainConfig.load(TINY).to_dict()
    raw["train"].update(cp=2, ulysses=2)
    ds = {**load_deepspeed_json(DS_JSONS[0]), "sequence_parallel_size": 2}
    with pytest.raises(ValueError) as err:
        fill_deepspeed_config(ds, TrainConfig.from_dict(raw), dp=1)
    message = str(err.value)
    assert "sequence_parallel_size=2" in message and "train.cp * train.ulysses=4" in message, message


def test_sequence_parallel_loss_scale_only_under_zero3():
    """ZeRO-3's reduce-scatter averages over the ranks sharing a sequence: the loss factor is their number there and
    1 elsewhere; ZeRO-3 with reduce_scatter off (averaged for some buckets, summed for others) is refused."""
    from nsa_dist.deepspeed import sequence_parallel_loss_scale

    zero = lambda stage, **kw: {"zero_optimization": {"stage": stage, **kw}}  # noqa: E731
    assert [sequence_parallel_loss_scale(zero(3), s) for s in (1, 2, 4)] == [1, 2, 4]
    assert [sequence_parallel_loss_scale(zero(stage), 4) for stage in (0, 1, 2)] == [1, 1, 1]
    assert sequence_parallel_loss_scale({}, 4) == 1
    assert sequence_parallel_loss_scale(zero(3, reduce_scatter=False), 1) == 1
    with pytest.raises(ValueError, match=r"zero_optimization.reduce_scatter=false .* sequence_parallel_size=2"):
        sequence_parallel_loss_scale(zero(3, reduce_scatter=False), 2)
