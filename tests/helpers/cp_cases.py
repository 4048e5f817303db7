"""Inputs of the context-parallel NSA tests, built identically in the test process and in every rank, and
megatron-core's batch splits written out independently: zigzag for unpacked batches, per document for packed
``thd`` batches (Transformer Engine's indices)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from tests.helpers.cp_harness import generator
from nsa_dist import BlockCompressor, NativeSparseAttention, NSAConfig
from nsa_dist.parallel import BranchKV, CPLayout
from nsa_dist.rotary import RotaryEmbedding
from nsa_kernels import NSAGeometry

GEOMETRY = dict(block_len=8, stride=4, select_len=8, top_n=4, init_blocks=1, local_blocks=2)
DK, DV, HQ = 8, 6, 4
# random weights at about PyTorch's Linear scale 1/sqrt(fan_in): activations and gradients stay O(1), so the
# float32 rounding of the single-rank reference itself stays well below the 1e-5 tolerance
WEIGHT_STD = 0.15
BRANCH_INPUTS = ("q", "k_c", "v_c", "k_s", "v_s", "k_w", "v_w", "gates")


@dataclass(frozen=True)
class Case:
    """One CP-vs-single-rank comparison: P ranks, layout, selection exchange, KV heads, length, documents."""
    P: int
    kind: str
    exchange: str
    kv_heads: int
    T: int
    window: int = 16
    num_docs: int = 4  # random document boundaries (0: no cu_seqlens, one document)
    doc_lengths: tuple = ()  # fixed document lengths instead
    batch: int = 1     # module cases: rows of x (documents) without cu_seqlens
    position_offset: Optional[int] = None  # module cases: global position_ids = arange(T) + offset
    geometry: tuple = ()  # overrides of GEOMETRY
    dtype: torch.dtype = torch.float32  # inputs are drawn in float32, then converted
    kv_sharing: str = "separate"  # module cases
    selection_scoring: str = "compressed"  # module cases
    full_selection: bool = False  # module cases: the layer's full-selection warm-up switch

    @property
    def nsa(self) -> Dict[str, int]:
        return {**GEOMETRY, **dict(self.geometry), "window": self.window}

    @property
    def nsa_geometry(self) -> NSAGeometry:
        """:attr:`nsa` as the geometry value :func:`~nsa_dist.parallel.context_parallel_nsa` takes."""
        return NSAGeometry(**self.nsa)

    def name(self) -> str:
        return (f"P{self.P}-{self.kind}-{self.exchange}-G{HQ // self.kv_heads}-T{self.T}-w{self.window}"
                f"-docs{self.doc_lengths or self.num_docs}-B{self.batch}-{self.kv_sharing}"
                f"-{str(self.dtype).split('.')[-1]}"
                f"-{self.selection_scoring}{'-full' if self.full_selection else ''}")


def cu_seqlens_of(case: Case, seed: int) -> Optional[torch.Tensor]:
    """Random document boundaries (documents straddle chunks and ranks; in the per_document layout, multiples of
    ``2P`` apart), ``case.doc_lengths``, or None."""
    if case.doc_lengths:
        return torch.tensor([0, *case.doc_lengths], dtype=torch.long).cumsum(0).to(torch.int32)
    if case.num_docs == 0:
        return None
    unit = 2 * case.P if case.kind == "per_document" else 1
    cuts = (torch.randperm(case.T // unit - 1, generator=generator(seed, 7))[:case.num_docs - 1] + 1) * unit
    return torch.tensor([0] + sorted(cuts.tolist()) + [case.T], dtype=torch.int32)


def layout_of(case: Case, seed: int) -> CPLayout:
    """The case's :class:`CPLayout` of ``T`` over ``P`` ranks, bound to its documents when per_document."""
    return CPLayout(case.P, case.T, case.kind, GEOMETRY["select_len"]).with_documents(cu_seqlens_of(case, seed))


def random_compressor(head_dim: int, gen: torch.Generator, block_len: int, stride: int) -> BlockCompressor:
    comp = BlockCompressor("mlp", head_dim, block_len, stride, 8)
    with torch.no_grad():
        for p in comp.parameters():  # away from the mean-pooling start, so every weight carries gradient
            p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=gen))
    return comp


def branch_inputs(case: Case, seed: int) -> Dict[str, torch.Tensor]:
    """Global ``[1, T, ...]`` inputs of the functional op and the output gradient ``dy``."""
    gen = generator(seed, 1)
    H, T = case.kv_heads, case.T
    shapes = dict(q=(HQ, DK), k_c=(H, DK), v_c=(H, DV), k_s=(H, DK), v_s=(H, DV), k_w=(H, DK), v_w=(H, DV),
                  gates=(HQ, 3), dy=(HQ, DV))
    out = {name: torch.randn(1, T, *shape, generator=gen) for name, shape in shapes.items()}
    out["gates"] = torch.sigmoid(out["gates"])
    return {name: t.to(case.dtype) for name, t in out.items()}


def functional_inputs(tensors: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, BranchKV, torch.Tensor]:
    """``(q, kv, gates)``, the tensor arguments of :func:`~nsa_dist.parallel.context_parallel_nsa`, from ``tensors``
    keyed by :data:`BRANCH_INPUTS` (``q [1, S, HQ, Dk]``, the branches' K/V ``[1, S, H, Dk|Dv]``, ``gates``)."""
    return tensors["q"], BranchKV(*(tensors[n] for n in BRANCH_INPUTS[1:-1])), tensors["gates"]


def compressors(case: Case, seed: int):
    """The mlp compressors of k and v (random weights) and the rotary embedding, in the case's dtype."""
    gen = generator(seed, 2)
    blocks = case.nsa["block_len"], case.nsa["stride"]
    return (random_compressor(DK, gen, *blocks).to(case.dtype), random_compressor(DV, gen, *blocks).to(case.dtype),
            RotaryEmbedding(DK))


def module_and_inputs(case: Case, seed: int, cp_group=None):
    """The NSA layer (mlp compressor, random weights), global x ``[B, T, hidden]``, dy and position_ids."""
    cfg = NSAConfig(hidden_size=16, num_heads=HQ, num_kv_heads=case.kv_heads, head_dim=DK, v_head_dim=DV,
                    compressor_hidden=8, kv_sharing=case.kv_sharing, cp_layout=case.kind,
                    cp_selection_exchange=case.exchange, selection_scoring=case.selection_scoring, **case.nsa)
    layer = NativeSparseAttention(cfg, cp_group=cp_group)
    layer.full_selection = case.full_selection
    gen = generator(seed, 3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=gen))
    x = torch.randn(case.batch, case.T, 16, generator=gen)
    dy = torch.randn(case.batch, case.T, 16, generator=gen)
    pos = None if case.position_offset is None else torch.arange(case.T) + case.position_offset
    return layer.to(case.dtype), x.to(case.dtype), dy.to(case.dtype), pos


def grad_or_zero(t: torch.Tensor) -> torch.Tensor:
    """``t.grad``, or zeros where nothing reached ``t`` (e.g. the window K/V with ``window=0``)."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def parameter_grads(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: grad_or_zero(p) for n, p in module.named_parameters()}


def sum_over_ranks(per_rank: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {n: sum(d[n] for d in per_rank) for n in per_rank[0]}


def megatron_zigzag(val: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """Megatron-core's ``get_batch_on_this_cp_rank`` for one tensor, written out independently."""
    val = val.view(*val.shape[0:seq_dim], 2 * cp_size, val.shape[seq_dim] // (2 * cp_size),
                   *val.shape[(seq_dim + 1):])
    index = torch.tensor([cp_rank, (2 * cp_size - cp_rank - 1)])
    val = val.index_select(seq_dim, index)
    return val.view(*val.shape[0:seq_dim], -1, *val.shape[(seq_dim + 2):])


def te_thd_partitioned_indices(cu_seqlens: torch.Tensor, total_tokens: int, world_size: int,
                               rank: int) -> torch.Tensor:
    """Transformer Engine's ``thd_get_partitioned_indices`` (its CUDA kernel's per-token loop), written out
    independently: the global token index of each of ``rank``'s ``total_tokens / world_size`` local tokens."""
    cu_s = [int(b) // world_size for b in cu_seqlens]  # the kernel's cu_seqlens_s
    batch = len(cu_s) - 1
    out = []
    for token_id in range(total_tokens // world_size):
        seq_id = min(bisect.bisect_right(cu_s, token_id), batch) - 1  # the kernel's binary_search
        seq_len = cu_s[seq_id + 1] - cu_s[seq_id]
        index = token_id - cu_s[seq_id]
        offset = rank if index < seq_len // 2 else (world_size - 1) * 2 - rank
        out.append(index + cu_s[seq_id] * world_size + seq_len // 2 * offset)
    return torch.tensor(out, dtype=torch.long)


def megatron_thd(val: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Megatron-core's ``get_thd_batch_on_this_cp_rank`` for one ``[1, T, ...]`` tensor (TE's indices)."""
    return val.index_select(1, te_thd_partitioned_indices(cu_seqlens, val.shape[1], cp_size, cp_rank))
