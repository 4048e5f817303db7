"""Context-parallel dense attention (all-gather K/V) on 2 and 4 gloo ranks equals the single rank: outputs and the
gradients of q, k, v (``allgather_dense_attention`` against per-document causal SDPA), of x and every parameter
(``DenseAttention`` with ``cp_group``), and the loss and parameter gradients of a dense GPT at cp 2 against cp 1.
Zigzag, contiguous and per-document layouts, packed documents straddling ranks, G in {1, 2, 4}; float64, max abs
<= 1e-10.
Also: ``nsa-dist train --attention dense --cp 2`` reports the losses of ``--cp 1`` (float32, 1e-5)."""
import functools
import json
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from tests.helpers.cp_harness import generator, run_ranks
from nsa_dist.cli import main
from nsa_dist.data import IGNORE_INDEX
from nsa_dist.models import GPT, DenseAttention, GPTConfig
from nsa_dist.models.dense import document_causal_mask
from nsa_dist.parallel import CPLayout, ShardedSequence
from nsa_dist.parallel.dense import allgather_dense_attention
from nsa_dist.training import ContextParallelGroup
from nsa_dist.training import use_context_parallel
from nsa_dist.training import TrainConfig

pytestmark = pytest.mark.slow  # spawns gloo process groups

ATOL = 1e-10
HQ, DK, DV, HIDDEN = 4, 8, 6, 16
DTYPE = torch.float64


@dataclass(frozen=True)
class Case:
    """P ranks, layout, KV heads (G = HQ / kv_heads), length; documents: fixed lengths, ``num_docs`` random ones
    (0: none, then each of the ``batch`` rows is one document)."""
    P: int
    kind: str
    kv_heads: int
    T: int
    doc_lengths: tuple = ()
    num_docs: int = 0
    batch: int = 1
    scale: Optional[float] = None
    position_offset: Optional[int] = None  # module cases: global position_ids = arange(T) + offset

    def name(self) -> str:
        docs = self.doc_lengths or self.num_docs
        return f"P{self.P}-{self.kind}-G{HQ // self.kv_heads}-T{self.T}-docs{docs}-B{self.batch}"


def cu_seqlens_of(case: Case, seed: int) -> Optional[torch.Tensor]:
    if case.doc_lengths:
        assert sum(case.doc_lengths) == case.T
        return torch.tensor([0, *case.doc_lengths]).cumsum(0).to(torch.int32)
    if case.num_docs == 0:
        return None
    cuts = torch.randperm(case.T - 1, generator=generator(seed, 7))[:case.num_docs - 1] + 1
    return torch.tensor([0] + sorted(cuts.tolist()) + [case.T], dtype=torch.int32)


def layout_of(case: Case, seed: int) -> CPLayout:
    """The case's layout over ``P`` ranks, bound to its documents when per_document."""
    return CPLayout(case.P, case.T, case.kind).with_documents(cu_seqlens_of(case, seed))


FUNCTIONAL = [
    # T = 96: zigzag chunks of 24, contiguous of 48; documents of 30 and 48 cross chunk and rank boundaries,
    # a 1-token and an empty document
    Case(2, "zigzag", 4, 96, doc_lengths=(30, 1, 0, 17, 48)),
    Case(2, "zigzag", 2, 96, num_docs=3, scale=0.3),
    Case(2, "contiguous", 1, 96, doc_lengths=(30, 1, 0, 17, 48)),
    Case(2, "contiguous", 4, 64, batch=2),
    # T = 128: zigzag chunks of 16, contiguous of 32; the 100-token document spans every rank
    Case(4, "zigzag", 1, 128, doc_lengths=(5, 100, 0, 23)),
    Case(4, "zigzag", 2, 64, batch=2),
    Case(4, "contiguous", 2, 128, num_docs=4),
    Case(4, "contiguous", 4, 128, doc_lengths=(5, 100, 0, 23)),
    # per_document (megatron-core's thd split): each document in 2P chunks
    Case(2, "per_document", 2, 96, doc_lengths=(28, 4, 0, 16, 48)),
    Case(4, "per_document", 4, 128, doc_lengths=(8, 96, 0, 24)),
]
MODULE = [
    Case(2, "zigzag", 2, 96, num_docs=3),
    Case(2, "contiguous", 4, 64, batch=2, position_offset=5),
    Case(4, "zigzag", 4, 128, doc_lengths=(5, 100, 0, 23)),
    Case(4, "contiguous", 1, 64, batch=2),
    Case(2, "per_document", 4, 96, doc_lengths=(28, 4, 0, 16, 48), position_offset=3),
    Case(4, "per_document", 1, 128, doc_lengths=(8, 96, 0, 24)),
]
# the GPT's batches are sharded by the layout with the NSA select_len (64 by default): T = 256
GPT_CASES = [Case(2, "zigzag", 2, 256, batch=2), Case(2, "contiguous", 2, 256, num_docs=3)]


@pytest.fixture(scope="module")
def cp_seed() -> int:
    env = os.environ.get("NSA_TEST_SEED")
    return int(env) if env else torch.seed() % (2 ** 63)


def functional_inputs(case: Case, seed: int):
    gen = generator(seed, 1)
    B, T, H = case.batch, case.T, case.kv_heads
    shapes = dict(q=(HQ, DK), k=(H, DK), v=(H, DV), dy=(HQ, DV))
    return {n: torch.randn(B, T, *s, generator=gen).to(DTYPE) for n, s in shapes.items()}


def functional_job(rank, world, case, seed):
    layout = layout_of(case, seed)
    inputs = functional_inputs(case, seed)
    flat = lambda t: layout.shard(t, rank).reshape(1, -1, *t.shape[2:])
    local = {n: flat(inputs[n]).requires_grad_() for n in ("q", "k", "v")}
    shards = ShardedSequence(layout, cu_seqlens_of(case, seed), case.batch)
    o = allgather_dense_attention(local["q"], local["k"], local["v"], shards=shards, group=dist.group.WORLD,
                                  scale=case.scale)
    (o * flat(inputs["dy"])).sum().backward()
    unflat = lambda t: t.reshape(case.batch, case.T // world, *t.shape[2:])
    return {"o": unflat(o.detach()), "grads": {n: unflat(t.grad) for n, t in local.items()}}


def single_rank_functional(case, seed):
    inputs = functional_inputs(case, seed)
    leaves = {n: inputs[n].clone().requires_grad_() for n in ("q", "k", "v")}
    G = HQ // case.kv_heads
    q, k, v = (t.transpose(1, 2) for t in (leaves["q"], leaves["k"].repeat_interleave(G, 2),
                                           leaves["v"].repeat_interleave(G, 2)))
    cu = cu_seqlens_of(case, seed)
    if cu is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=case.scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(cu, case.T), scale=case.scale)
    o = o.transpose(1, 2)
    (o * inputs["dy"]).sum().backward()
    return o.detach(), {n: t.grad for n, t in leaves.items()}, {}


def dense_layer(case: Case, seed: int, cp_group=None):
    """The dense layer (random weights, rotary), global x ``[B, T, hidden]``, dy and position_ids."""
    layer = DenseAttention(HIDDEN, HQ, case.kv_heads, DK, cp_group=cp_group, cp_layout=case.kind)
    gen = generator(seed, 3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    x = torch.randn(case.batch, case.T, HIDDEN, generator=gen)
    dy = torch.randn(case.batch, case.T, HIDDEN, generator=gen)
    pos = None if case.position_offset is None else torch.arange(case.T) + case.position_offset
    return layer.to(DTYPE), x.to(DTYPE), dy.to(DTYPE), pos


def module_job(rank, world, case, seed):
    layer, x, dy, pos = dense_layer(case, seed, cp_group=dist.group.WORLD)
    layout = layout_of(case, seed)
    x_local = layout.shard(x, rank).requires_grad_()
    y = layer(x_local, cu_seqlens=cu_seqlens_of(case, seed), position_ids=pos)
    (y * layout.shard(dy, rank)).sum().backward()
    return {"o": y.detach(), "grads": {"x": x_local.grad},
            "params": {n: p.grad for n, p in layer.named_parameters()}}


def single_rank_module(case, seed):
    layer, x, dy, pos = dense_layer(case, seed)
    x = x.requires_grad_()
    y = layer(x, cu_seqlens=cu_seqlens_of(case, seed), position_ids=pos)
    (y * dy).sum().backward()
    return y.detach(), {"x": x.grad}, {n: p.grad for n, p in layer.named_parameters()}


def gpt_loss(case: Case, seed: int, cp: ContextParallelGroup):
    """Loss (summed over the group) and parameter gradients (all-reduced) of a 2-layer dense GPT made
    context-parallel by the training job's ``use_context_parallel``. The cross-entropy is taken here, in float64,
    because the model runs on packed documents (``cu_seqlens``), which the job's ``loss_and_accuracy`` does not
    pass."""
    torch.manual_seed(seed % (2 ** 31))
    model = GPT(GPTConfig(vocab_size=11, hidden_size=HIDDEN, num_layers=2, num_heads=HQ,
                          num_kv_heads=case.kv_heads, attention="dense", nsa={"cp_layout": case.kind})).to(DTYPE)
    if cp.group is not None:
        use_context_parallel(model, cp.group)
    gen = generator(seed, 5)
    tokens = torch.randint(0, 11, (case.batch, case.T), generator=gen)
    targets = torch.randint(0, 11, (case.batch, case.T), generator=gen)
    targets[torch.rand(case.batch, case.T, generator=gen) < 0.3] = IGNORE_INDEX
    logits = model(cp.shard(tokens), cu_seqlens=cu_seqlens_of(case, seed))
    loss = F.cross_entropy(logits.flatten(0, 1), cp.shard(targets).flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / (targets != IGNORE_INDEX).sum()
    loss.backward()
    cp.sum_gradients(model.parameters())
    return cp.sum(loss.detach().clone()).item(), {n: p.grad for n, p in model.named_parameters()}


def gpt_job(rank, world, case, seed):
    select_len = GPTConfig(vocab_size=11, hidden_size=HIDDEN, num_heads=HQ, attention="dense").nsa_config().select_len
    return gpt_loss(case, seed, ContextParallelGroup(dist.group.WORLD, case.kind, select_len))


def error_job(rank, world, seed):
    """The message for a layout whose P differs from the group's."""
    case = Case(world, "zigzag", 2, 16 * world)
    t = {n: x[:, :8].reshape(1, 8, *x.shape[2:]) for n, x in functional_inputs(case, seed).items()}
    try:
        allgather_dense_attention(t["q"], t["k"], t["v"], shards=ShardedSequence(CPLayout(2 * world, 16 * world)),
                                  group=None)
    except ValueError as exc:
        return str(exc)
    return None


def run_jobs(rank, world, jobs, seed):
    return [fn(rank, world, case, seed) for fn, case in jobs] + [error_job(rank, world, seed)]


def all_jobs(P):
    return ([(functional_job, c) for c in FUNCTIONAL if c.P == P] + [(module_job, c) for c in MODULE if c.P == P]
            + [(gpt_job, c) for c in GPT_CASES if c.P == P])


@functools.lru_cache(maxsize=None)
def results_for(P, seed):
    """Per job of :func:`all_jobs` the list of the P ranks' results; under ``None`` the ranks' error messages."""
    jobs = all_jobs(P)
    per_rank = run_ranks(run_jobs, P, jobs, seed, timeout=240)
    out = {job: [per_rank[r][i] for r in range(P)] for i, job in enumerate(jobs)}
    out[None] = [per_rank[r][-1] for r in range(P)]
    return out


def assert_matches(case, seed, ranks, expected):
    """Unshard the ranks' outputs and input gradients, sum their parameter gradients, compare (max abs)."""
    layout = layout_of(case, seed)
    o, grads, params = expected
    errors = {"o": (layout.unshard([r["o"] for r in ranks]) - o).abs().max().item()}
    for n, g in grads.items():
        assert g.abs().max() > 0, f"d{n}: zero reference gradient"
        errors[f"d{n}"] = (layout.unshard([r["grads"][n] for r in ranks]) - g).abs().max().item()
    for n, g in params.items():
        assert g.abs().max() > 0, f"d[{n}]: zero reference gradient"
        errors[f"d[{n}]"] = (sum(r["params"][n] for r in ranks) - g).abs().max().item()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= ATOL, f"{case.name()} seed {seed}: max abs error {errors[worst]:.3g} in {worst}; {errors}"


@pytest.mark.parametrize("case", FUNCTIONAL, ids=Case.name)
def test_allgather_dense_attention_equals_single_rank(cp_seed, case):
    ranks = results_for(case.P, cp_seed)[(functional_job, case)]
    assert_matches(case, cp_seed, ranks, single_rank_functional(case, cp_seed))


@pytest.mark.parametrize("case", MODULE, ids=Case.name)
def test_dense_attention_module_cp_equals_single_rank(cp_seed, case):
    ranks = results_for(case.P, cp_seed)[(module_job, case)]
    assert_matches(case, cp_seed, ranks, single_rank_module(case, cp_seed))


@pytest.mark.parametrize("case", GPT_CASES, ids=Case.name)
def test_dense_gpt_cp2_loss_and_grads_equal_cp1(cp_seed, case):
    ranks = results_for(case.P, cp_seed)[(gpt_job, case)]
    loss, grads = gpt_loss(case, cp_seed, ContextParallelGroup())
    for r, (rank_loss, rank_grads) in enumerate(ranks):
        assert abs(rank_loss - loss) <= ATOL, f"{case.name()} seed {cp_seed}: rank {r} loss {rank_loss} vs {loss}"
        errors = {n: (rank_grads[n] - g).abs().max().item() for n, g in grads.items()}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= ATOL, f"{case.name()} seed {cp_seed}: rank {r} d[{worst}] off by {errors[worst]:.3g}"
        assert all(g.abs().max() > 0 for g in grads.values())


def test_dense_training_cp2_losses_equal_cp1(tmp_path):
    """``nsa-dist train --attention dense --cp 2`` (3 steps of tiny-cpu): the losses of ``--cp 1``, step by step."""
    raw = TrainConfig.load("configs/train/tiny-cpu.yaml").to_dict()
    raw["train"].update(steps=3, log_every=1, warmup_steps=1, batch_size=4, eval_batches=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    for cp in (1, 2):
        main(["train", "--config", str(config), "--attention", "dense", "--cp", str(cp), "--out-dir",
              str(tmp_path / f"cp{cp}"), "--no-progress", "--seed", "5"])
    one, two = (json.loads((tmp_path / f"cp{cp}" / "metrics.json").read_text()) for cp in (1, 2))
    assert one["cp"] == 1 and two["cp"] == 2
    losses = [(a["loss"], b["loss"]) for a, b in zip(one["history"], two["history"])]
    losses += [(one[k]["loss"], two[k]["loss"]) for k in ("initial_eval", "final_eval")]
    assert len(losses) == 5 and losses[0][0] != losses[-1][0]  # the steps changed the model
    for a, b in losses:
        assert abs(a - b) <= 1e-5, f"CP=1 vs CP=2 losses {losses}"


@pytest.mark.parametrize("P", [2, 4])
def test_group_and_layout_mismatch_is_an_error(cp_seed, P):
    for message in results_for(P, cp_seed)[None]:
        assert message is not None and f"group has {P} ranks" in message and f"P={2 * P} ranks" in message
