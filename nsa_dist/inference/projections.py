"""The projections of an attention layer's input for decoding, computed with the layer's own submodules as its
forward computes them (:class:`~nsa_dist.NativeSparseAttention`, :class:`~nsa_dist.models.DenseAttention`)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..attention import NativeSparseAttention
from ..branch_kv import BranchKV
from ..branches import rotated_keys
from ..models.dense import DenseAttention


def nsa_branch_kv(layer: NativeSparseAttention, kv: torch.Tensor, dtype: torch.dtype) -> BranchKV:
    """The branches' un-rotated K/V ``[B, S, H, Dk|Dv]`` in ``dtype`` from the layer's ``kv_proj`` output
    ``kv [B, S, branches * H * (Dk + Dv)]`` (the same tensors for every branch with ``kv_sharing="shared"``)."""
    c = layer.config
    B, S = kv.shape[:2]
    kv = kv.view(B, S, c.num_kv_branches, c.num_kv_heads, c.head_dim + c.v_head_dim).to(dtype)
    return BranchKV.from_projection(kv, c.head_dim, shared=c.kv_sharing == "shared")


def nsa_projections(layer: NativeSparseAttention, x: torch.Tensor) -> Tuple[torch.Tensor, BranchKV, torch.Tensor]:
    """``x [B, S, hidden]`` -> un-rotated ``q [B, S, HQ, Dk]``, the branches' un-rotated K/V (:func:`nsa_branch_kv`)
    and the gates ``[B, S, HQ, 3]`` after the sigmoid with ``disabled_branches`` zeroed, all in q's dtype (as
    :func:`~nsa_dist.branches.nsa_branches` receives and casts them)."""
    c = layer.config
    q, kv, gates = layer.project(x)
    gates = gates.to(q.dtype)
    if c.branch_gate_mask is not None:
        gates = gates * gates.new_tensor(c.branch_gate_mask)
    return q, nsa_branch_kv(layer, kv, q.dtype), gates


def rotated_branch_kv(layer: NativeSparseAttention, kv: BranchKV, positions: torch.Tensor) -> BranchKV:
    """``kv`` with the selection and window keys rotated at ``positions`` (``[S]`` or ``[B, S]``) as training rotates
    them (:func:`~nsa_dist.branches.nsa_branches`); unchanged without rotary."""
    return kv if layer.rotary is None else rotated_keys(layer.config, kv, layer.rotary, positions)


def rotate(rotary: Optional[torch.nn.Module], x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x [B, S, H, D]`` rotated at ``positions`` (``[S]`` or ``[B, S]``), or ``x`` when ``rotary`` is None."""
    return x if rotary is None else rotary(x, positions)


def dense_kv(layer: DenseAttention, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Un-rotated ``k``, ``v [B, S, H, D]`` of ``x [B, S, hidden]`` (the key and value rows of ``qkv_proj`` only)."""
    B, S = x.shape[:2]
    rows = layer.num_heads * layer.head_dim
    bias = layer.qkv_proj.bias
    kv = F.linear(x, layer.qkv_proj.weight[rows:], None if bias is None else bias[rows:])
    kv = kv.view(B, S, 2 * layer.num_kv_heads, layer.head_dim)
    return kv.split([layer.num_kv_heads, layer.num_kv_heads], dim=2)


def dense_projections(layer: DenseAttention, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Un-rotated ``q [B, S, HQ, D]``, ``k``, ``v [B, S, H, D]`` of ``x [B, S, hidden]``, as the layer splits them."""
    B, S = x.shape[:2]
    return layer.qkv_proj(x).view(B, S, -1, layer.head_dim).split(
        [layer.num_heads, layer.num_kv_heads, layer.num_kv_heads], dim=2)
