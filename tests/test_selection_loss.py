"""The selection (indexer) loss against brute-force float64 loops: the student scores are the oracle's selection
scores, the teacher is explicit masked softmax attention summed per block, the loss is the KL over the blocks top-n
ranks; gradcheck; the auxiliary-loss attachment; row sampling; the layer switch."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from tests.helpers import oracle as O

from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_dist.selection_loss import (
    attach_aux_loss,
    ranked_blocks,
    ranked_kl,
    sample_rows,
    selection_loss,
    sequence_geometry,
    student_block_importance,
    teacher_block_mass,
)
from nsa_kernels import NSAGeometry, total_compressed_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

GEO = dict(block_len=8, stride=4, select_len=8)
PICK = dict(top_n=3, init_blocks=1, local_blocks=1)
NSA_GEO = NSAGeometry(**GEO, **PICK, window=0)
ALL_ROWS = 10 ** 6  # more than any test sequence: every eligible row is taken (deterministic)
CASES = {  # name -> (B, T, cu_seqlens lengths or None, HQ, H)
    "unpacked-G1": (2, 75, None, 2, 2),
    "packed-G2": (1, 91, [37, 5, 49], 4, 2),
    "packed-G4": (1, 70, [29, 41], 4, 1),
}


def _inputs(B, T, lengths, HQ, H, dtype=torch.float64, dk=4):
    cu = O.cu_seqlens_of(lengths)
    nc = total_compressed_blocks(T, GEO["block_len"], GEO["stride"], cu)
    q = torch.randn(B, T, HQ, dk, dtype=dtype)
    k_cmp = torch.randn(B, nc, H, dk, dtype=dtype)
    k_sel = torch.randn(B, T, H, dk, dtype=dtype)
    return q, k_cmp, k_sel, cu


def _spans(T, lengths):
    return O.oracle_doc_spans(T, O.cu_seqlens_of(lengths))


def _brute_teacher(q, k_sel, b, t, start, h, scale, select_len):
    """``{j: mass}`` of full causal attention of row t (keys start..t) over the G heads of KV head h."""
    HQ, H = q.shape[2], k_sel.shape[2]
    mass = {}
    for hq in range(HQ):
        if hq // (HQ // H) != h:
            continue
        logits = [float((q[b, t, hq] * k_sel[b, s, h]).sum()) * scale for s in range(start, t + 1)]
        top = max(logits)
        z = math.fsum(math.exp(x - top) for x in logits)
        for s, x in zip(range(start, t + 1), logits):
            j = (s - start) // select_len
            mass[j] = mass.get(j, 0.0) + math.exp(x - top) / z
    return mass


def _ranked(local_t, select_len, top_n, init_blocks, local_blocks):
    last = local_t // select_len
    return [j for j in range(last + 1) if j >= init_blocks and j <= last - local_blocks]


@pytest.mark.parametrize("case", sorted(CASES))
def test_student_is_the_selection_score(case, seed):
    B, T, lengths, HQ, H = CASES[case]
    q, k_cmp, _, cu = _inputs(B, T, lengths, HQ, H)
    geometry = sequence_geometry(cu, T, GEO["block_len"], GEO["stride"], q.device)
    rows = torch.arange(T)
    num_sel = int(geometry.local.max()) // GEO["select_len"] + 1
    student = student_block_importance(q, k_cmp, rows, geometry, num_sel, scale=0.5, **GEO)
    oracle = O.oracle_block_scores(q, k_cmp, scale=0.5, cu_seqlens=cu, **GEO)  # NaN: not a candidate
    candidate = ~torch.isnan(oracle)
    J = oracle.shape[-1]
    torch.testing.assert_close(student[..., :J][candidate], oracle[candidate], rtol=1e-10, atol=1e-12,
                               msg=f"seed {seed}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_teacher_is_block_mass_of_full_attention(case, seed):
    B, T, lengths, HQ, H = CASES[case]
    q, _, k_sel, cu = _inputs(B, T, lengths, HQ, H)
    geometry = sequence_geometry(cu, T, GEO["block_len"], GEO["stride"], q.device)
    rows = torch.randperm(T)[:23].sort().values
    num_sel = int(geometry.local.max()) // GEO["select_len"] + 1
    teacher = teacher_block_mass(q[:, rows], k_sel, rows, geometry, num_sel, GEO["select_len"], 0.7)
    for b in range(B):
        for r, t in enumerate(rows.tolist()):
            start = next(s for s, e in _spans(T, lengths) if s <= t < e)
            for h in range(H):
                mass = _brute_teacher(q, k_sel, b, t, start, h, 0.7, GEO["select_len"])
                expected = torch.tensor([mass.get(j, 0.0) for j in range(num_sel)], dtype=torch.float64)
                torch.testing.assert_close(teacher[b, r, h], expected, rtol=1e-10, atol=1e-12,
                                           msg=f"seed {seed}, b {b}, t {t}, h {h}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_is_mean_kl_over_ranked_blocks(case, seed):
    B, T, lengths, HQ, H = CASES[case]
    q, k_cmp, k_sel, cu = _inputs(B, T, lengths, HQ, H)
    scale = 0.6
    loss = selection_loss(q, k_cmp, k_sel, NSA_GEO, scale=scale, num_rows=ALL_ROWS, cu_seqlens=cu)
    scores = O.oracle_block_scores(q, k_cmp, scale=scale, cu_seqlens=cu, **GEO)
    terms = []
    for b in range(B):
        for start, end in _spans(T, lengths):
            for t in range(start, end):
                local_t = t - start
                if local_t // GEO["select_len"] + 1 <= PICK["top_n"]:
                    continue  # every candidate is selected: no loss
                ranked = _ranked(local_t, GEO["select_len"], **PICK)
                for h in range(H):
                    mass = _brute_teacher(q, k_sel, b, t, start, h, scale, GEO["select_len"])
                    zt = math.fsum(mass.get(j, 0.0) for j in ranked)
                    zs = math.fsum(float(scores[b, t, h, j]) for j in ranked)
                    terms.append(math.fsum(
                        mass[j] / zt * math.log((mass[j] / zt) / (float(scores[b, t, h, j]) / zs))
                        for j in ranked if mass.get(j, 0.0) > 0))
    assert terms, "the case must have rows where top-n chooses"
    expected = math.fsum(terms) / len(terms)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12), f"seed {seed}"
    assert loss.item() >= 0


def test_loss_gradients_gradcheck(seed):
    """The loss's gradient in k_cmp (the teacher does not depend on it); the student function itself is
    differentiable in q and k_cmp (gradcheck with the teacher held fixed), but the loss detaches q: its gradient
    reaches k_cmp only, equal to the fixed-teacher student's k_cmp gradient."""
    q, k_cmp, k_sel, cu = _inputs(1, 77, [37, 40], 2, 1, dk=3)
    q.requires_grad_(True)
    k_cmp.requires_grad_(True)
    assert gradcheck(lambda k_: selection_loss(q.detach(), k_, k_sel, NSA_GEO, scale=0.8, num_rows=ALL_ROWS,
                                               cu_seqlens=cu), (k_cmp,), eps=1e-6, atol=1e-6), f"seed {seed}"
    geometry = sequence_geometry(cu, 77, GEO["block_len"], GEO["stride"], None)
    rows = sample_rows(geometry, ALL_ROWS, GEO["select_len"], PICK["top_n"])
    num_sel = int(geometry.local.max()) // GEO["select_len"] + 1
    teacher = teacher_block_mass(q[:, rows], k_sel, rows, geometry, num_sel, GEO["select_len"], 0.8)
    ranked = ranked_blocks(geometry.local[rows], num_sel, GEO["select_len"], PICK["init_blocks"],
                           PICK["local_blocks"])[None, :, None]

    def with_fixed_teacher(q_, k_):
        student = student_block_importance(q_[:, rows], k_, rows, geometry, num_sel, scale=0.8, **GEO)
        return ranked_kl(teacher, student, ranked)

    assert gradcheck(with_fixed_teacher, (q, k_cmp), eps=1e-6, atol=1e-6), f"seed {seed}"
    loss = selection_loss(q, k_cmp, k_sel, NSA_GEO, scale=0.8, num_rows=ALL_ROWS, cu_seqlens=cu)
    torch.testing.assert_close(loss, with_fixed_teacher(q, k_cmp))
    grad_q, grad_k = torch.autograd.grad(loss, (q, k_cmp), allow_unused=True)
    assert grad_q is None, "the loss must not reach the queries"
    expected = torch.autograd.grad(with_fixed_teacher(q, k_cmp), k_cmp)[0]
    assert grad_k.abs().sum() > 0
    torch.testing.assert_close(grad_k, expected)


def test_teacher_is_detached(seed):
    q, k_cmp, k_sel, _ = _inputs(1, 60, None, 2, 1)
    k_sel.requires_grad_(True)
    selection_loss(q, k_cmp.requires_grad_(True), k_sel, NSA_GEO, scale=0.5, num_rows=ALL_ROWS).backward()
    assert k_sel.grad is None


def test_sampled_rows_are_bounded_distinct_and_eligible(seed):
    lengths = [100, 30, 170]
    cu = O.cu_seqlens_of(lengths)
    geometry = sequence_geometry(cu, 300, 8, 4, None)
    rows = sample_rows(geometry, 40, select_len=8, top_n=3)
    assert rows.numel() == 40 and rows.unique().numel() == 40, f"seed {seed}"
    assert bool((geometry.local[rows] // 8 + 1 > 3).all()), f"seed {seed}"
    eligible = int((geometry.local // 8 + 1 > 3).sum())
    assert sample_rows(geometry, 10 ** 4, 8, 3).numel() == eligible
    short = sequence_geometry(None, 20, 8, 4, None)  # 3 blocks: top-n takes them all
    assert sample_rows(short, 8, 8, 3).numel() == 0


def test_no_choosing_row_gives_zero_loss_with_a_graph():
    q = torch.randn(1, 20, 2, 4, requires_grad=True)
    loss = selection_loss(q, torch.randn(1, 4, 1, 4, requires_grad=True), torch.randn(1, 20, 1, 4), NSA_GEO,
                          scale=0.5, num_rows=8)
    assert loss.item() == 0.0 and loss.requires_grad


def test_attach_aux_loss_adds_weighted_gradient(seed):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = attach_aux_loss(x * 2.0, (y ** 2).sum(), 0.3)
    torch.testing.assert_close(out, x * 2.0)
    (out * torch.arange(3.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(x.grad, 2.0 * torch.arange(3.0, dtype=torch.float64).expand(5, 3))
    torch.testing.assert_close(y.grad, 0.3 * 2 * y.detach())


def _layer(weight, **extra):
    return NativeSparseAttention(NSAConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, block_len=8,
                                           stride=4, select_len=8, top_n=3, window=8,
                                           selection_loss_weight=weight, selection_loss_rows=12, **extra))


def test_layer_applies_the_loss_only_when_switched_on(seed):
    torch.manual_seed(seed)
    on = _layer(0.5)
    off = _layer(0.0)
    off.load_state_dict(on.state_dict())
    x = torch.randn(1, 67, 16)
    cu = torch.tensor([0, 30, 67], dtype=torch.int32)
    y_on, y_off = on(x, cu_seqlens=cu), off(x, cu_seqlens=cu)
    torch.testing.assert_close(y_on, y_off, rtol=0, atol=0)  # the forward is unchanged
    assert off.last_selection_loss is None and on.last_selection_loss.item() > 0
    y_on.sum().backward()
    y_off.sum().backward()
    diff = (on.kv_proj.weight.grad - off.kv_proj.weight.grad).abs().max()
    assert diff > 0, "the selection loss must reach the compression branch's key projection"
    for name in ("q_proj", "o_proj"):  # the student's queries are detached; o_proj is not in the loss
        torch.testing.assert_close(getattr(on, name).weight.grad, getattr(off, name).weight.grad)
    with torch.no_grad():
        on(x, cu_seqlens=cu)
    assert on.last_selection_loss is None  # evaluation computes no loss


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_weight_is_refused(bad):
    with pytest.raises(ValueError, match="selection_loss_weight"):
        _layer(bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_rows_are_refused(bad):
    with pytest.raises(ValueError, match="selection_loss_rows"):
        NSAConfig(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4, selection_loss_rows=bad)
