"""Tile-size sweep for the range-attention kernels (compressed and window branches) on one GPU.

Coordinate search from the heuristic of :func:`nsa_kernels.triton.range_attention.pick_config`: the forward
fields are swept timing the forward, then the dq fields and the dK/dV fields timing forward+backward, each
group keeping the best of the previous ones. Each candidate is checked against the default configuration's
output (a config that compiles to wrong results would be worse than a slow one). Prints every candidate and
the best ``RangeConfig``; stops sweeping when ``--budget-s`` is spent.

    python benchmarks/tune_range.py --branch compressed --seqlen 65536 --heads 64 --kv-heads 4
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Callable, Dict, Optional, Sequence

import torch

import nsa_kernels
from nsa_kernels.triton import range_attention

try:  # run as a script (python benchmarks/...) or as a module
    from kernels import add_shape_arguments
except ImportError:
    from benchmarks.kernels import add_shape_arguments

GROUPS = {
    "fwd": dict(fwd_rows=[64, 128], fwd_keys=[32, 64, 128], fwd_warps=[4, 8], fwd_stages=[2, 3, 4]),
    "dq": dict(dq_keys=[32, 64, 128], dq_warps=[4, 8], dq_stages=[1, 2, 3]),
    "dkdv": dict(dkdv_keys=[32, 64, 128], dkdv_rows=[32, 64, 128], dkdv_warps=[4, 8], dkdv_stages=[1, 2]),
}


def make_case(branch: str, T: int, HQ: int, H: int, D: int):
    """``(fn, leaves)`` of one compressed (paper l 32, d 16) or window (w 512) call on random bf16 inputs."""
    leaf = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
    q = leaf(1, T, HQ, D)
    if branch == "compressed":
        nc = (T - 32) // 16 + 1
        k, v = leaf(1, nc, H, D), leaf(1, nc, H, D)
        return (lambda: nsa_kernels.compressed_attention(q, k, v, 32, 16)[0]), [q, k, v]
    k, v = leaf(1, T, H, D), leaf(1, T, H, D)
    return (lambda: nsa_kernels.window_attention(q, k, v, 512)), [q, k, v]


def measure(fn, leaves, grad, mode: str, reference) -> float:
    """Median ms of ``mode`` under the current override, or inf when the result differs from ``reference``
    (max abs error of the output and, for fwd+bwd, of dq over 5e-2 in bf16) or the launch fails."""
    from triton.testing import do_bench
    try:
        with torch.no_grad():
            out = fn()
        if (out.float() - reference[0]).abs().max().item() > 5e-2:
            return float("inf")
        if mode == "fwd":
            with torch.no_grad():
                return do_bench(fn, warmup=10, rep=50, return_mode="median")
        for t in leaves:
            t.grad = None
        fn().backward(grad)
        if (leaves[0].grad.float() - reference[1]).abs().max().item() > 5e-2:
            return float("inf")
        return do_bench(lambda: fn().backward(grad), warmup=10, rep=50, grad_to_none=leaves, return_mode="median")
    except Exception as exc:  # out of shared memory / registers: not a candidate
        print(f"    failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return float("inf")


def set_override(config: Optional[dict]) -> None:
    """Run the range kernels with ``config`` (``None``: the heuristic)."""
    range_attention.CONFIG_OVERRIDE = config


def coordinate_search(groups: Dict[str, dict], order: Sequence[str], initial: dict,
                      configure: Callable[[Optional[dict]], None], fn, leaves, grad, reference,
                      deadline: float) -> dict:
    """Sweep each group of fields in ``order`` (every combination of its values, the other fields at the best
    so far), timing the forward for the group named ``"fwd"`` and forward+backward for the others; print each
    candidate and return the best configuration. ``configure(config)`` installs a candidate, ``configure(None)``
    restores the defaults; sweeping stops at ``deadline`` (``time.time()``)."""
    best = dict(initial)
    for group in order:
        space = groups[group]
        mode = "fwd" if group == "fwd" else "fwd+bwd"
        results = []
        for values in itertools.product(*space.values()):
            if time.time() > deadline:
                break
            cand = {**best, **dict(zip(space, values))}
            configure(cand)
            ms = measure(fn, leaves, grad, mode, reference)
            results.append((ms, cand))
            print(json.dumps({"group": group, "mode": mode, "ms": ms, **dict(zip(space, values))}), flush=True)
        configure(None)
        if results:
            best = min(results, key=lambda r: r[0])[1]
            print(f"best after {group}: {min(r[0] for r in results):.2f} ms {mode}", flush=True)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branch", choices=["compressed", "window"], default="compressed")
    parser.add_argument("--seqlen", type=int, default=65536)
    add_shape_arguments(parser)
    parser.add_argument("--budget-s", type=float, default=240)
    parser.add_argument("--groups", nargs="+", choices=sorted(GROUPS), default=list(GROUPS),
                        help="field groups to sweep, in order")
    args = parser.parse_args(argv)
    start = time.time()
    fn, leaves = make_case(args.branch, args.seqlen, args.heads, args.kv_heads, args.dim)
    with nsa_kernels.use_backend("triton"):
        grad = torch.randn_like(fn())
        fn().backward(grad)
        reference = (fn().detach().float(), leaves[0].grad.float().clone())
        mode = range_attention.COMPRESSED if args.branch == "compressed" else range_attention.WINDOW
        base = range_attention.pick_config(range_attention.RangeGeometry(mode), args.dim, args.dim)._asdict()
        best = coordinate_search(GROUPS, args.groups, base, set_override, fn, leaves, grad, reference,
                                 start + args.budget_s)
    print("default:", json.dumps(base))
    print("best:   ", json.dumps(best))


if __name__ == "__main__":
    main()
