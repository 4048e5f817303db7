"""Why NSA does or does not retrieve: what its branches do at the answer positions of the retrieval task.

:func:`retrieval_diagnostics` runs a model over retrieval batches (:class:`~nsa_dist.data.Batch` with
:class:`~nsa_dist.data.Needles`) and reports, per NSA layer and KV head, averaged over the answer positions:

- ``selection_recall``: the fraction of answers whose needle lies in a selection block the answer's query
  selected (block ``needle_row // select_len`` among the ``top_n`` of :func:`nsa_kernels.select_blocks`, or of
  the selection from the selected branch's own logits under ``selection_scoring="key_bound"`` or
  ``"max_logit"``, the forced blocks included);
- ``max_logit_recall``: the same for the blocks max-logit selection would pick (each block's exact largest logit
  of the selected branch, :mod:`nsa_dist.max_logit_selection`), whatever the layer's scoring: how much recall
  the selected branch's own attention could give;
- ``compressed_mass``: the compressed-attention probability, summed over the compressed blocks that contain the
  needle (block ``i`` covers tokens ``[i*d, i*d + l)``), averaged over the group's query heads; top-n ranks blocks
  by this mass, so it must stand out for the needle's block to be selected;
- ``gates``: the mean gate of each branch (compressed, selected, window) over the group's query heads;

and, for any model (dense too), ``accuracy_by_depth``: the answers' accuracy by the needle's depth (its position
over the sequence length) in ``depth_bins`` equal bins (None for a bin without answers).

While :class:`NeedleProbe` is active the single-rank path of :func:`~nsa_dist.branches.nsa_branches` hands each
NSA layer's rotated q, compressed keys, selection keys and gates to it (:func:`observe_branches`); the probe
recomputes the selection with the public ops at the answer rows only. It needs unpacked sequences and one rank.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

import nsa_kernels
from nsa_kernels.reference.selection import pick_by_block_logits

from .data import IGNORE_INDEX, Batch, Needles
from .logit_selection import own_logit_selection

BRANCH_NAMES = ("compressed", "selected", "window")
_active: Optional["NeedleProbe"] = None


class NeedleProbe:
    """Accumulates the per-layer statistics of the module docstring over the forwards made while it is active
    (``with probe.watching(needles): model(tokens)``); layers are told apart by call order within a forward."""

    def __init__(self):
        self.layers: List[Dict[str, torch.Tensor]] = []  # per layer: running sums [H] and the answer count
        self._needles: Optional[Needles] = None
        self._layer = 0

    @contextlib.contextmanager
    def watching(self, needles: Needles) -> Iterator[None]:
        """Make this the active probe for one forward over a batch whose answers and needles are ``needles``."""
        global _active
        if _active is not None:
            raise RuntimeError("another NeedleProbe is already watching")
        self._needles, self._layer, _active = needles, 0, self
        try:
            yield
        finally:
            self._needles, _active = None, None

    @torch.no_grad()
    def observe(self, config, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
                gates: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> None:
        """Add one NSA layer's statistics. ``q [B, T, HQ, Dk]``, ``k_cmp [B, Nc, H, Dk]`` and the selection keys
        ``k_slc [B, T, H, Dk]`` rotated as the kernels see them, ``v_cmp [B, Nc, H, Dv]``, ``gates [B, T, HQ, 3]``
        after the sigmoid (and the disabled-branch mask); ``config`` the layer's :class:`~nsa_dist.NSAConfig`."""
        if cu_seqlens is not None:
            raise ValueError("NeedleProbe needs unpacked sequences (cu_seqlens=None)")
        rows, needles = (t.to(q.device) for t in self._needles)
        B, T, HQ, _ = q.shape
        H = k_cmp.shape[2]
        G = HQ // H
        geometry = dict(block_len=config.block_len, stride=config.stride)
        _, lse = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, scale=config.softmax_scale, **geometry)
        blocks = dict(select_len=config.select_len, top_n=config.top_n, init_blocks=config.init_blocks,
                      local_blocks=config.local_blocks)
        if config.selection_scoring == "compressed":
            idx = nsa_kernels.select_blocks(q, k_cmp, lse, **blocks, **geometry, scale=config.softmax_scale)
        else:
            idx = own_logit_selection(config, q, k_slc, None)
        b = torch.arange(B, device=q.device)[:, None]
        needle_block = (needles // config.select_len)[:, :, None, None]
        recall = (idx[b, rows] == needle_block).any(-1).double()                           # [B, P, H]

        scale = config.softmax_scale or q.shape[-1] ** -0.5
        q_rows = q[b, rows].double().view(B, rows.shape[1], H, G, -1)              # [B, P, H, G, Dk]
        logits = torch.einsum("bphgd,bshd->bphgs", q_rows, k_cmp.double()) * scale
        start = torch.arange(k_cmp.shape[1], device=q.device) * config.stride
        visible = start[None, None, :] + config.block_len - 1 <= rows[:, :, None]         # [B, P, Nc]
        holds = (start[None, None, :] <= needles[:, :, None]) & (needles[:, :, None] < start + config.block_len)
        p = torch.exp(logits - lse[b, rows].double().view(B, -1, H, G, 1))
        mass = torch.where((visible & holds)[:, :, None, None, :], p, 0.0).sum(-1).mean(-1)  # [B, P, H]
        gate = gates[b, rows].double().view(B, -1, H, G, 3).mean(3)                        # [B, P, H, 3]
        keys = torch.arange(T, device=q.device)
        key_logits = (torch.einsum("bphgd,bthd->bphgt", q_rows, k_slc.double()) * scale).masked_fill(
            (keys > rows[:, :, None])[:, :, None, None], float("-inf"))                      # causal
        key_probs = torch.softmax(key_logits, dim=-1)
        # the answers' own block maxima (not the whole sequence's): what max-logit selection picks for them
        num_sel = -(-T // config.select_len)
        block_max = F.pad(key_logits, (0, num_sel * config.select_len - T), value=float("-inf")).view(
            *key_logits.shape[:-1], num_sel, config.select_len).amax(-1)                     # [B, P, H, G, nsel]
        exact = torch.cat([pick_by_block_logits(block_max[i:i + 1].permute(0, 2, 3, 1, 4), rows[i], **blocks)
                           for i in range(B)])                                                # [B, P, H, n]
        exact_recall = (exact == needle_block).any(-1).double()                            # [B, P, H]
        in_block = (keys // config.select_len)[None, None, :] == (needles // config.select_len)[:, :, None]
        key_mass = torch.where(in_block[:, :, None, None], key_probs, 0.0).sum(-1).mean(-1)   # [B, P, H]

        stats = {"selection_recall": recall.sum((0, 1)), "max_logit_recall": exact_recall.sum((0, 1)),
                 "compressed_mass": mass.sum((0, 1)),
                 "selection_key_mass": key_mass.sum((0, 1)),
                 **{f"gate_{name}": gate[..., i].sum((0, 1)) for i, name in enumerate(BRANCH_NAMES)},
                 "count": torch.tensor(float(B * rows.shape[1]), dtype=torch.float64, device=q.device)}
        if self._layer == len(self.layers):
            self.layers.append(stats)
        else:
            self.layers[self._layer] = {k: self.layers[self._layer][k] + v for k, v in stats.items()}
        self._layer += 1

    def summary(self) -> List[Dict]:
        """Per layer: ``{"selection_recall": [H], "max_logit_recall": [H], "compressed_mass": [H],
        "selection_key_mass": [H], "gates": {branch: [H]}}`` (means)."""
        out = []
        for stats in self.layers:
            mean = {k: (v / stats["count"]).tolist() for k, v in stats.items() if k != "count"}
            gates = {name: mean.pop(f"gate_{name}") for name in BRANCH_NAMES}
            out.append({**mean, "gates": gates})
        return out


def observe_branches(config, q, k_cmp, v_cmp, k_slc, gates, cu_seqlens) -> None:
    """Hand one NSA layer's branch inputs to the active :class:`NeedleProbe`, if any (see its ``observe``)."""
    if _active is not None:
        _active.observe(config, q, k_cmp, v_cmp, k_slc, gates, cu_seqlens)


@torch.no_grad()
def retrieval_diagnostics(model: torch.nn.Module, batches: Sequence[Batch], device: torch.device,
                          autocast=contextlib.nullcontext, depth_bins: int = 10) -> Dict:
    """The module docstring's statistics of ``model`` (a :class:`~nsa_dist.GPT`, in eval mode for the call)
    over retrieval ``batches`` (each with ``needles``): ``{"layers": [...], "accuracy_by_depth": [depth_bins],
    "answers_by_depth": [depth_bins]}``; ``layers`` is empty for a model without NSA layers. ``autocast()``
    gives the forward's precision context."""
    if any(batch.needles is None for batch in batches):
        raise ValueError("retrieval_diagnostics needs retrieval batches (Batch.needles set)")
    probe = NeedleProbe()
    correct = torch.zeros(depth_bins, dtype=torch.float64)
    answers = torch.zeros(depth_bins, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with probe.watching(batch.needles), autocast():
                logits = model(batch.tokens.to(device))
            rows, needles = batch.needles
            b = torch.arange(rows.shape[0])[:, None]
            targets = batch.targets[b, rows]
            if bool((targets == IGNORE_INDEX).any()):
                raise ValueError("Batch.needles.answer_rows must point at labelled positions")
            hit = (logits[b.to(device), rows.to(device)].argmax(-1).cpu() == targets).double()
            depth = torch.clamp(needles * depth_bins // batch.tokens.shape[1], max=depth_bins - 1)
            correct.index_add_(0, depth.flatten(), hit.flatten())
            answers.index_add_(0, depth.flatten(), torch.ones_like(hit).flatten())
    finally:
        model.train(was_training)
    accuracy = [None if n == 0 else float(c / n) for c, n in zip(correct, answers)]
    return {"layers": probe.summary(), "accuracy_by_depth": accuracy, "answers_by_depth": answers.tolist()}
