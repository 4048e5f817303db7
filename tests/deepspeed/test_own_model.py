"""examples/deepspeed/own_model.py: a user-written transformer with NSA layers, trained with deepspeed.initialize and
nsa-dist's mpu, gives on 2 gloo ranks (CP 2) the losses and NSA gradients of one process; without the CP group in
its NSA layers it does not (the comparison would catch a model that ignores context parallelism)."""
from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

from examples.deepspeed import own_model  # noqa: E402
from tests.helpers.cp_harness import run_ranks  # noqa: E402

pytestmark = pytest.mark.slow  # DeepSpeed training runs on spawned gloo ranks

STEPS = 4


def train_rank(rank: int, world_size: int, use_cp_group: bool) -> dict:
    """The example's training on one rank of a CP group spanning the world, with a ZeRO-2 config whose Adam eps
    is raised to 1e-2: Adam's first steps are about lr * sign(g), and a large eps keeps a near-zero gradient's
    float32 rounding from flipping an update."""
    config = own_model.deepspeed_config(own_model.ZERO2, micro_batch=2, dp=1, lr=1e-2)
    config["optimizer"]["params"]["eps"] = 1e-2
    return own_model.train(world_size, STEPS, seed=3, ds_config=config, use_cp_group=use_cp_group, verbose=False)


@pytest.fixture(scope="module")
def single():
    """The example's history on one process."""
    (history,) = run_ranks(train_rank, 1, True)
    return history


def relative_gap(one: dict, two: dict, key: str) -> float:
    """The largest relative difference between two histories' values of ``key`` over the steps."""
    return max(abs(a - b) / abs(a) for a, b in zip(one[key], two[key], strict=True))


def test_cp2_equals_one_process(single):
    split = run_ranks(train_rank, 2, True)
    assert split[0] == split[1]  # both ranks report the whole batch's values
    assert single["loss"][-1] < single["loss"][0] - 0.1, single["loss"]  # the steps did train
    assert all(norm > 1e-3 for norm in single["nsa_grad_norm"]), single["nsa_grad_norm"]  # gradients reached NSA
    for key in ("loss", "nsa_grad_norm"):
        assert relative_gap(single, split[0], key) <= 1e-5, (key, single[key], split[0][key])


def test_without_the_cp_group_it_differs(single):
    # each rank's NSA layers then attend within its own shard only: the comparison above must see it
    split = run_ranks(train_rank, 2, False)
    for key in ("loss", "nsa_grad_norm"):
        assert relative_gap(single, split[0], key) > 1e-4, (key, single[key], split[0][key])
