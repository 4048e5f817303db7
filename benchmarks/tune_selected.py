"""Tile-size sweep for the selected-attention kernels on one GPU.

Sweeps the module knobs of :mod:`nsa_kernels.triton.selected_attention` (``FWD_MIN_ROWS``, ``MAX_BLOCK_S`` and the
forward/dq warps, timing the forward; then ``BWD_ROWS``, ``CHUNK_FACTOR`` and the dK/dV warps, timing
forward+backward, from the best forward choice) on the paper geometry (l' 64, n 16) with the block indices
``select_blocks`` picks on random inputs. Each candidate is checked against the default's output and dq.

    python benchmarks/tune_selected.py --seqlen 65536 --heads 64 --kv-heads 4
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import nsa_kernels
from nsa_kernels.triton import selected_attention as SA

try:  # run as a script (python benchmarks/...) or as a module
    from kernels import add_shape_arguments
    from tune_range import coordinate_search
except ImportError:
    from benchmarks.kernels import add_shape_arguments
    from benchmarks.tune_range import coordinate_search

GROUPS = {
    "fwd": dict(FWD_MIN_ROWS=[16, 32, 64], MAX_BLOCK_S=[32, 64], fwd_warps=[4, 8]),
    "bwd": dict(BWD_ROWS=[32, 64, 128], CHUNK_FACTOR=[1, 2, 4], bwd_warps=[4, 8]),
}
WARPS = ("fwd_warps", "bwd_warps")


def apply(choice: dict, heuristic) -> None:
    """Set the module knobs of ``choice``; warps replace the heuristic's (``heuristic`` = the original
    ``_config``), other fields keep it."""
    for name, value in choice.items():
        if name not in WARPS:
            setattr(SA, name, value)
    warps = {k: v for k, v in choice.items() if k in WARPS}
    SA._config = (lambda *a: heuristic(*a)._replace(**warps)) if warps else heuristic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=65536)
    add_shape_arguments(parser)
    parser.add_argument("--budget-s", type=float, default=240)
    args = parser.parse_args(argv)
    start, T, HQ, H, D = time.time(), args.seqlen, args.heads, args.kv_heads, args.dim
    leaf = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
    q, k, v = leaf(1, T, HQ, D), leaf(1, T, H, D), leaf(1, T, H, D)
    nc = (T - 32) // 16 + 1
    with torch.no_grad(), nsa_kernels.use_backend("triton"):
        k_cmp = torch.randn(1, nc, H, D, device="cuda", dtype=torch.bfloat16)
        _, lse = nsa_kernels.compressed_attention(q, k_cmp, k_cmp, 32, 16)
        idx = nsa_kernels.select_blocks(q, k_cmp, lse, 32, 16, 64, 16)
    fn = lambda: nsa_kernels.selected_attention(q, k, v, idx, 64)
    heuristic = SA._config
    defaults = {name: getattr(SA, name) for group in GROUPS.values() for name in group if name not in WARPS}
    with nsa_kernels.use_backend("triton"):
        grad = torch.randn_like(fn())
        fn().backward(grad)
        reference = (fn().detach().float(), q.grad.float().clone())
        configure = lambda config: apply(defaults if config is None else config, heuristic)
        best = coordinate_search(GROUPS, list(GROUPS), defaults, configure, fn, [q, k, v], grad, reference,
                                 start + args.budget_s)
    print("default:", json.dumps(defaults), "(warps from the heuristic)")
    print("best:   ", json.dumps(best))


if __name__ == "__main__":
    main()
