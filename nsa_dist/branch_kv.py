"""The keys and values of the three NSA branches as one bundle (:class:`BranchKV`), as the layer front ends hand
them to :func:`~nsa_dist.branches.nsa_branches` and it hands them to
:func:`~nsa_dist.parallel.context_parallel_nsa`."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class BranchKV(NamedTuple):
    """The keys and values of the three NSA branches, in the order compression, selection, window.

    Each key is ``[B, S, H, Dk]`` and each value ``[B, S, H, Dv]``, all six over the same rows: the layer's
    ``[B, T]`` tokens for :func:`~nsa_dist.branches.nsa_branches` (this rank's ``T / P`` shard under context
    parallelism), this rank's local rows flattened to ``[1, B*T/P]`` for
    :func:`~nsa_dist.parallel.context_parallel_nsa`. With ``kv_sharing="shared"`` the three branches hold the
    same K/V.

    Fields:
        k_cmp_raw, v_cmp_raw: the compression branch's raw K/V, un-rotated and before the compressors (the
            compressed keys are rotated at their block's last token after compression).
        k_slc, v_slc: the selection branch's K/V; ``nsa_branches`` takes the keys un-rotated (it rotates them
            like q), ``context_parallel_nsa`` takes them rotated like q.
        k_win, v_win: the window branch's K/V, keys rotated as ``k_slc``.
    """
    k_cmp_raw: torch.Tensor
    v_cmp_raw: torch.Tensor
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_win: torch.Tensor
    v_win: torch.Tensor

    @classmethod
    def from_projection(cls, kv: torch.Tensor, head_dim: int, shared: bool) -> "BranchKV":
        """The bundle from a layer's K/V projection ``kv [B, S, branches, H, Dk + Dv]`` (``head_dim = Dk``): branch
        ``i`` of ``kv`` for the compression, selection and window branches in turn, or branch 0 for all three when
        ``shared`` (``kv_sharing="shared"``, one K/V projection)."""
        k_all, v_all = kv.split([head_dim, kv.shape[-1] - head_dim], dim=-1)
        branch = [0, 0, 0] if shared else [0, 1, 2]
        (k_c, k_s, k_w), (v_c, v_s, v_w) = ([t[:, :, i] for i in branch] for t in (k_all, v_all))
        return cls(k_c, v_c, k_s, v_s, k_w, v_w)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "BranchKV":
        """The bundle of ``fn(t)`` for each tensor ``t``, in field order (e.g. a cast or a reshape of all six)."""
        return BranchKV(*(fn(t) for t in self))
