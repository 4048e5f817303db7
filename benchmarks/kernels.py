"""Kernel benchmark: nsa_attention (Triton) against dense causal SDPA (flash, cuDNN) and fla-core's NSA.

One run, side by side, B = 1, HQ = 64, H = 4, D = 128, bf16, for each T: forward and forward+backward
medians from ``triton.testing.do_bench``, achieved TFLOP/s from the branch FLOP counts and the FLOP
ratio to dense causal attention (the speed-up ceiling). Prints a markdown table, writes
``<out>.json`` and ``<out>.png``.

    python benchmarks/kernels.py --seqlens 8192 16384 32768 65536 131072 --out benchmarks/results/kernels

fla-core (``fla.ops.nsa.parallel_nsa``) is timed when importable, in the configuration it supports:
mean pooling over 64 tokens, selection blocks of 64, n = 16, no window; ours is timed in that
configuration too (block_len = stride = 64, ``window=0``) besides the paper's (l 32, d 16, l' 64, n 16, w 512).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import nsa_kernels


@dataclass(frozen=True)
class Geometry:
    name: str
    block_len: int
    stride: int
    select_len: int
    top_n: int
    window: int


PAPER = Geometry("nsa paper (l32 d16 l'64 n16 w512)", 32, 16, 64, 16, 512)
FLA_CONFIG = Geometry("nsa fla-config (mean64 l'64 n16 no window)", 64, 64, 64, 16, 0)


def dense_flops(T: int, HQ: int, D: int) -> float:
    """Forward FLOPs of causal attention: QK^T and PV over half the T x T scores."""
    return 2 * 2 * T * (T / 2) * HQ * D


def nsa_flops(geo: Geometry, T: int, HQ: int, D: int) -> Dict[str, float]:
    """Forward FLOPs of each branch (compressed keys seen on average Nc/2, selection scoring once more)."""
    nc = max(0, (T - geo.block_len) // geo.stride + 1)
    return {"cmp": 2 * 2 * T * (nc / 2) * HQ * D, "score": 2 * T * (nc / 2) * HQ * D,
            "slc": 2 * 2 * T * min(T / 2, geo.top_n * geo.select_len) * HQ * D,
            "win": 2 * 2 * T * min(T / 2, geo.window) * HQ * D}


def fwd_bwd_flops(fwd_by_part: Dict[str, float]) -> float:
    """Backward costs 2.5x the forward for attention parts (dQ, dK, dV); selection scoring has no backward."""
    return sum(f * (1 if part == "score" else 3.5) for part, f in fwd_by_part.items())


def bench(fn: Callable[[], None], grads: List[torch.Tensor]) -> float:
    """Median ms of ``fn`` over about 1 s of repetitions (a 128k NSA forward+backward gets 2-3 samples, where
    ``do_bench``'s default 100 ms gave a single one), L2 flushed before each."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=1000, grad_to_none=grads, return_mode="median")


def make_nsa_case(geo: Geometry, T: int, HQ: int, H: int, D: int, dtype, device):
    nc = max(0, (T - geo.block_len) // geo.stride + 1)
    leaf = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    q = leaf(1, T, HQ, D)
    tensors = [q, leaf(1, nc, H, D), leaf(1, nc, H, D), leaf(1, T, H, D), leaf(1, T, H, D), leaf(1, T, H, D),
               leaf(1, T, H, D), torch.rand(1, T, HQ, 3, device=device, dtype=dtype).requires_grad_()]
    kwargs = dict(block_len=geo.block_len, stride=geo.stride, select_len=geo.select_len, top_n=geo.top_n,
                  window=geo.window)
    return (lambda: nsa_kernels.nsa_attention(*tensors, **kwargs)), tensors


def make_sdpa_case(backend, T: int, HQ: int, H: int, D: int, dtype, device):
    from torch.nn.attention import sdpa_kernel
    leaf = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    q, k, v = leaf(1, HQ, T, D), leaf(1, H, T, D), leaf(1, H, T, D)
    G = HQ // H

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                  is_causal=True)
    return run, [q, k, v]


def make_fla_case(T: int, HQ: int, H: int, D: int, dtype, device):
    from fla.ops.nsa import parallel_nsa
    leaf = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    q, k, v = leaf(1, T, HQ, D), leaf(1, T, H, D), leaf(1, T, H, D)
    g_cmp, g_slc = (torch.rand(1, T, HQ, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    return (lambda: parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=16, block_size=64, window_size=0)), [
        q, k, v, g_cmp, g_slc]


def time_case(make: Callable, modes: List[str]) -> Dict[str, Optional[float]]:
    """Median ms of ``fwd`` and ``fwd+bwd`` (None plus the error text when the case fails, e.g. OOM)."""
    out: Dict[str, Optional[float]] = {}
    try:
        fn, leaves = make()
        o = fn()
        grad = torch.randn_like(o)
        for mode in modes:
            if mode == "fwd":
                with torch.no_grad():
                    out[mode] = bench(fn, [])
            else:
                out[mode] = bench(lambda: fn().backward(grad), leaves)
        del o, grad, leaves, fn
    except Exception as exc:  # a failed case is reported in the table, not fatal for the run
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    torch.cuda.empty_cache()
    return out


def run(args) -> Dict:
    from torch.nn.attention import SDPBackend
    device, dtype = "cuda", torch.bfloat16
    HQ, H, D = args.heads, args.kv_heads, args.dim
    try:
        import fla.ops.nsa  # noqa: F401
        have_fla = HQ // H >= 16
    except ImportError:
        have_fla = False
    rows = []
    for T in args.seqlens:
        cases = {
            PAPER.name: lambda: make_nsa_case(PAPER, T, HQ, H, D, dtype, device),
            FLA_CONFIG.name: lambda: make_nsa_case(FLA_CONFIG, T, HQ, H, D, dtype, device),
            "sdpa flash (dense)": lambda: make_sdpa_case(SDPBackend.FLASH_ATTENTION, T, HQ, H, D, dtype, device),
            "sdpa cudnn (dense)": lambda: make_sdpa_case(SDPBackend.CUDNN_ATTENTION, T, HQ, H, D, dtype, device),
        }
        if have_fla:
            cases["fla-core parallel_nsa"] = lambda: make_fla_case(T, HQ, H, D, dtype, device)
        small_g = f"nsa paper, G = {args.small_group} (HQ {H * args.small_group})"
        if args.small_group:
            cases[small_g] = lambda: make_nsa_case(PAPER, T, H * args.small_group, H, D, dtype, device)
        dense = dense_flops(T, HQ, D)
        flops = {PAPER.name: nsa_flops(PAPER, T, HQ, D), FLA_CONFIG.name: nsa_flops(FLA_CONFIG, T, HQ, D),
                 "fla-core parallel_nsa": nsa_flops(FLA_CONFIG, T, HQ, D),
                 small_g: nsa_flops(PAPER, T, H * args.small_group, D)}
        with nsa_kernels.use_backend("triton"):
            for name, make in cases.items():
                times = time_case(make, args.modes)
                parts = flops.get(name, {"dense": dense})
                fwd_f, both_f = sum(parts.values()), fwd_bwd_flops(parts) if name in flops else 3.5 * dense
                heads = H * args.small_group if name == small_g else HQ
                row = {"T": T, "method": name, "HQ": heads, **times,
                       "flop_ratio_to_dense": fwd_f / (dense * heads / HQ),
                       "tflops_fwd": fwd_f / times["fwd"] / 1e9 if times.get("fwd") else None,
                       "tflops_fwd_bwd": both_f / times["fwd+bwd"] / 1e9 if times.get("fwd+bwd") else None}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "B": 1, "HQ": HQ, "H": H, "D": D, "dtype": "bf16",
            "rows": rows}


def table(result: Dict) -> str:
    """Markdown table with each method's ratio to cuDNN at the same T."""
    cudnn = {(r["T"], m): r.get(m) for r in result["rows"] if r["method"].startswith("sdpa cudnn")
             for m in ("fwd", "fwd+bwd")}
    fmt = lambda x, spec=".1f": "-" if x is None else format(x, spec)
    lines = ["| T | method | fwd ms | fwd+bwd ms | fwd vs cuDNN | fwd+bwd vs cuDNN | fwd+bwd ms per query head "
             "| TFLOP/s fwd | TFLOP/s fwd+bwd | FLOPs / dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = lambda m: (cudnn[(r["T"], m)] / r[m]) if r.get(m) and cudnn.get((r["T"], m)) else None
        per_head = r["fwd+bwd"] / r.get("HQ", result["HQ"]) if r.get("fwd+bwd") else None
        same_heads = r.get("HQ", result["HQ"]) == result["HQ"]
        lines.append(f"| {r['T'] // 1024}k | {r['method']} | {fmt(r.get('fwd'))} | {fmt(r.get('fwd+bwd'))} | "
                     + (f"{fmt(ratio('fwd'), '.2f')}x | {fmt(ratio('fwd+bwd'), '.2f')}x | " if same_heads else "- | - | ")
                     + f"{fmt(per_head, '.2f')} | {fmt(r.get('tflops_fwd'))} | "
                     f"{fmt(r.get('tflops_fwd_bwd'))} | {fmt(r['flop_ratio_to_dense'], '.3f')} |"
                     + (f" {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def plot(result: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({r["method"] for r in result["rows"]})
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for m in methods:
            pts = [(r["T"], r[mode]) for r in result["rows"] if r["method"] == m and r.get(mode)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="median ms", title=f"{mode}, {result['device']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--heads`` (HQ, default 64), ``--kv-heads`` (H, default 4), ``--dim`` (D, default 128): the benchmarks' shape."""
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    add_shape_arguments(parser)
    parser.add_argument("--small-group", type=int, default=4,
                        help="also time the paper configuration with HQ = H * this (G = 4: HQ 16); 0 = off")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--out", default="benchmarks/results/kernels", help="output path stem (.json, .png)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}, B=1 HQ={args.heads} "
          f"H={args.kv_heads} D={args.dim} bf16")
    print(table(result))


if __name__ == "__main__":
    main()
