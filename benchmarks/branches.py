"""Per-branch timing of the Triton NSA ops, and the per-kernel split of one forward+backward.

Where does ``nsa_attention``'s time go? For one geometry and each T this times, with
``triton.testing.do_bench`` (median ms), each branch op alone, forward and forward+backward, on the inputs
the full op would give it (``select_blocks`` on the real compressed ``lse``), then the whole ``nsa_attention``;
"other" is the whole minus the sum of the branches (gate multiply-adds, casts, host work). With
``--profile`` it also prints the CUDA kernels of one forward+backward by total time (torch.profiler).

    python benchmarks/branches.py --seqlens 65536 131072 --heads 64 --kv-heads 4 --out benchmarks/results/branches
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch

import nsa_kernels

try:  # run as a script (python benchmarks/branches.py) or as a module
    from kernels import FLA_CONFIG, PAPER, Geometry, add_shape_arguments, bench
except ImportError:
    from benchmarks.kernels import FLA_CONFIG, PAPER, Geometry, add_shape_arguments, bench

GEOMETRIES = {"paper": PAPER, "fla": FLA_CONFIG}


def branch_cases(geo: Geometry, T: int, HQ: int, H: int, D: int, dtype, device) -> Dict[str, tuple]:
    """``name -> (fn, leaves, has_backward)`` for every branch and the whole op, on shared random inputs."""
    nc = max(0, (T - geo.block_len) // geo.stride + 1)
    leaf = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    q, k_cmp, v_cmp = leaf(1, T, HQ, D), leaf(1, nc, H, D), leaf(1, nc, H, D)
    k, v = leaf(1, T, H, D), leaf(1, T, H, D)
    gates = torch.rand(1, T, HQ, 3, device=device, dtype=dtype).requires_grad_()
    with torch.no_grad():
        _, lse = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, geo.block_len, geo.stride)
        idx = nsa_kernels.select_blocks(q, k_cmp, lse, geo.block_len, geo.stride, geo.select_len, geo.top_n)
    cases = {
        "compressed": (lambda: nsa_kernels.compressed_attention(q, k_cmp, v_cmp, geo.block_len, geo.stride)[0],
                       [q, k_cmp, v_cmp], True),
        "select_blocks": (lambda: nsa_kernels.select_blocks(q, k_cmp, lse, geo.block_len, geo.stride,
                                                            geo.select_len, geo.top_n), [], False),
        "selected": (lambda: nsa_kernels.selected_attention(q, k, v, idx, geo.select_len), [q, k, v], True),
    }
    if geo.window:
        cases["window"] = (lambda: nsa_kernels.window_attention(q, k, v, geo.window), [q, k, v], True)
    cases["nsa_attention (all)"] = (
        lambda: nsa_kernels.nsa_attention(q, k_cmp, v_cmp, k, v, k, v, gates, block_len=geo.block_len,
                                          stride=geo.stride, select_len=geo.select_len, top_n=geo.top_n,
                                          window=geo.window), [q, k_cmp, v_cmp, k, v, gates], True)
    return cases


def time_branches(cases: Dict[str, tuple]) -> Dict[str, Dict[str, float]]:
    """``name -> {"fwd": ms, "fwd+bwd": ms}`` (``fwd+bwd`` only for differentiable cases)."""
    out = {}
    for name, (fn, leaves, has_bwd) in cases.items():
        with torch.no_grad():
            row = {"fwd": bench(fn, [])}
        if has_bwd:
            grad = torch.randn_like(fn())
            row["fwd+bwd"] = bench(lambda: fn().backward(grad), leaves)
        out[name] = row
        print(json.dumps({"case": name, **row}), file=sys.stderr, flush=True)
    parts = [r for n, r in out.items() if not n.startswith("nsa_attention")]
    whole = out["nsa_attention (all)"]
    out["other (whole - branches)"] = {m: whole[m] - sum(r.get(m, r["fwd"]) for r in parts) for m in whole}
    return out


def kernel_profile(fn, leaves: List[torch.Tensor], top: int = 15) -> List[Dict]:
    """CUDA kernels of one forward+backward of ``fn`` (after a warm-up call), by total time."""
    from torch.profiler import ProfilerActivity, profile
    grad = torch.randn_like(fn())
    fn().backward(grad)
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn().backward(grad)
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:90], "calls": e.count, "ms": e.device_time_total / 1e3}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[65536])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="paper")
    add_shape_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="also print the per-kernel split")
    parser.add_argument("--out", default=None, help="write the results to <out>.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/branches.py needs a CUDA GPU")
    geo = GEOMETRIES[args.geometry]
    result = {"device": torch.cuda.get_device_name(), "geometry": geo.name, "HQ": args.heads, "H": args.kv_heads,
              "D": args.dim, "runs": []}
    for T in args.seqlens:
        with nsa_kernels.use_backend("triton"):
            cases = branch_cases(geo, T, args.heads, args.kv_heads, args.dim, torch.bfloat16, "cuda")
            times = time_branches(cases)
            run = {"T": T, "branches": times}
            if args.profile:
                fn, leaves, _ = cases["nsa_attention (all)"]
                run["kernels"] = kernel_profile(fn, leaves)
        result["runs"].append(run)
        print(f"\n{result['device']}, {geo.name}, T={T}, HQ={args.heads} H={args.kv_heads} D={args.dim} bf16")
        print("| branch | fwd ms | fwd+bwd ms |\n|---|---|---|")
        for name, r in times.items():
            print(f"| {name} | {r['fwd']:.2f} | {r['fwd+bwd']:.2f} |" if "fwd+bwd" in r else
                  f"| {name} | {r['fwd']:.2f} | - |")
        for k in run.get("kernels", []):
            print(f"  {k['ms']:9.2f} ms  {k['calls']:4d}x  {k['kernel']}")
        del cases
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
