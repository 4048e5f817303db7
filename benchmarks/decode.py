"""Decode benchmark: one NSA decode step of one layer against dense SDPA over the same cache, bf16.

The NSA step is the Triton decode (``nsa_kernels.triton.nsa_decode``); dense attention is a length-1 query over
the whole cache (torch SDPA), per context length and batch.

For each shape (``HQ x H``, default 64 x 4 and the Llama shape 32 x 8, D = 128), context (16k to 128k tokens, every
sequence full) and batch (1, 8): median ms per step from ``triton.testing.do_bench`` (L2 flushed before each run),
microseconds per decoded token (step / B), the bytes of cache each step reads per token (NSA: compressed K twice,
for attention and for the block scores, compressed V once, the top-n selected blocks, the window; dense: all K/V)
and the fraction of the HBM bandwidth (``--hbm-tbps``, default 4.8 for an H200) that achieves. Dense attention
takes the fastest SDPA backend that runs with ``enable_gqa=True`` (flash, cuDNN, memory-efficient, math), or, where
none does, with K/V heads repeated (a copy of G times the cache per call): the table says which.
``--cuda-graph`` times both steps replayed from a captured CUDA graph (no launch overhead). Prints a markdown table
with the ratios, writes ``--out`` (JSON).

    python benchmarks/decode.py --out benchmarks/results/decode.json --cuda-graph

The NSA cache is random (paper geometry l 32, d 16, l' 64, n 16, w 512, separate K/V as ``NSALayerCache`` holds
it); only the attention of the step is timed, not the cache append or the projections.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from nsa_kernels import NSAGeometry

PAPER = NSAGeometry(block_len=32, stride=16, select_len=64, top_n=16, window=512, init_blocks=1, local_blocks=2)
ELEM = 2  # bf16 bytes


def nsa_bytes_per_token(geo: NSAGeometry, context: int, H: int, Dk: int, Dv: int) -> int:
    """Cache bytes one NSA step reads per sequence (query at position ``context - 1``)."""
    n_cmp = max(0, (context - geo.block_len) // geo.stride + 1)
    selected = min(context, geo.top_n * geo.select_len)
    window = min(context, geo.window)
    return ELEM * H * (n_cmp * (2 * Dk + Dv) + (selected + window) * (Dk + Dv))


def dense_bytes_per_token(context: int, H: int, Dk: int, Dv: int) -> int:
    """Cache bytes dense attention reads per sequence: every key and value."""
    return ELEM * H * context * (Dk + Dv)


def timed(fn: Callable[[], object], cuda_graph: bool) -> float:
    """Median ms of ``fn`` (or of replaying its captured CUDA graph), L2 flushed before each run."""
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    if cuda_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as CUDA graph capture wants
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return do_bench(graph.replay, warmup=25, rep=500, return_mode="median")
    return do_bench(fn, warmup=25, rep=500, return_mode="median")


def nsa_case(B: int, context: int, HQ: int, H: int, D: int) -> Callable[[], torch.Tensor]:
    """The step of ``B`` sequences of ``context`` tokens (the newest one the query's own) on a random cache."""
    from nsa_dist.inference import DecodeKV
    from nsa_dist.inference.positions import ring_positions
    from nsa_kernels.triton.nsa_decode import nsa_decode
    geo, dev, dt = PAPER, "cuda", torch.bfloat16
    rand = lambda *shape: torch.randn(*shape, device=dev, dtype=dt)
    lengths = torch.full((B,), context - 1, device=dev)
    positions = lengths[:, None]
    n_cmp = (context - geo.block_len) // geo.stride + 1
    win_pos = torch.cat([ring_positions(lengths, geo.window), positions], 1)
    kv = DecodeKV(rand(B, n_cmp, H, D), rand(B, n_cmp, H, D), rand(B, context, H, D), rand(B, context, H, D),
                  rand(B, geo.window + 1, H, D), rand(B, geo.window + 1, H, D), win_pos, None, None)
    q, gates = rand(B, 1, HQ, D), torch.rand(B, 1, HQ, 3, device=dev, dtype=dt)
    return lambda: nsa_decode(q, positions, kv, gates, geo)


def dense_cases(B: int, context: int, HQ: int, H: int, D: int, repeat: bool) -> Dict[str, Callable[[], object]]:
    """Dense attention of one query per sequence over the whole cache, per SDPA backend: GQA by ``enable_gqa`` or,
    with ``repeat``, by K/V heads repeated ``HQ / H`` times (a copy of the cache per call)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    q = rand(B, HQ, 1, D)
    k, v = rand(B, context, H, D).transpose(1, 2), rand(B, context, H, D).transpose(1, 2)  # cache layout [B, N, H, D]
    G = HQ // H

    def case(backend):
        def run():
            with sdpa_kernel(backend):
                if repeat:
                    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return run
    backends = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH)
    return {f"{b.name.lower()} {'repeat' if repeat else 'gqa'}": case(b) for b in backends}


def fastest_dense(B: int, context: int, HQ: int, H: int, D: int, cuda_graph: bool) -> Tuple[Optional[float], str]:
    """(ms, backend) of the fastest SDPA backend that runs with ``enable_gqa``, or, where none does, with K/V heads
    repeated; (None, the errors) when nothing runs."""
    errors: List[str] = []
    for repeat in (False, True):
        best: Tuple[Optional[float], str] = (None, "")
        for name, fn in dense_cases(B, context, HQ, H, D, repeat).items():
            try:
                ms = timed(fn, cuda_graph)
            except Exception as exc:  # a backend that refuses the shape is skipped
                errors.append(f"{name}: {type(exc).__name__}")
                continue
            finally:
                torch.cuda.empty_cache()
            if best[0] is None or ms < best[0]:
                best = (ms, name)
        if best[0] is not None:
            return best
    return None, "; ".join(errors)


def run(args) -> Dict:
    rows = []
    for shape in args.shapes:
        HQ, H = (int(x) for x in shape.split("x"))
        for context in args.contexts:
            for B in args.batches:
                row = {"HQ": HQ, "H": H, "D": args.dim, "context": context, "B": B}
                try:
                    row["nsa_ms"] = timed(nsa_case(B, context, HQ, H, args.dim), args.cuda_graph)
                except Exception as exc:  # e.g. out of memory: reported in the table
                    row["nsa_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                torch.cuda.empty_cache()
                row["dense_ms"], row["dense_backend"] = fastest_dense(B, context, HQ, H, args.dim, args.cuda_graph)
                torch.cuda.empty_cache()
                row["nsa_bytes_per_token"] = nsa_bytes_per_token(PAPER, context, H, args.dim, args.dim)
                row["dense_bytes_per_token"] = dense_bytes_per_token(context, H, args.dim, args.dim)
                for kind in ("nsa", "dense"):
                    ms = row.get(f"{kind}_ms")
                    row[f"{kind}_us_per_token"] = ms * 1e3 / B if ms else None
                    row[f"{kind}_hbm_fraction"] = (row[f"{kind}_bytes_per_token"] * B / (ms * 1e-3)
                                                   / (args.hbm_tbps * 1e12)) if ms else None
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "dtype": "bf16", "geometry": PAPER._asdict(),
            "cuda_graph": args.cuda_graph, "hbm_tbps": args.hbm_tbps, "rows": rows}


def table(result: Dict) -> str:
    """Markdown table: per row the NSA and dense times, their ratio, bytes per token and HBM fractions."""
    fmt = lambda x, spec=".3f": "-" if x is None else format(x, spec)
    lines = ["| HQ x H | context | B | NSA ms | NSA us/token | dense ms | dense / NSA | NSA MB/token | dense MB/token "
             "| bytes dense / NSA | NSA % HBM | dense % HBM | dense backend |", "|" + "---|" * 13]
    for r in result["rows"]:
        speedup = r["dense_ms"] / r["nsa_ms"] if r.get("dense_ms") and r.get("nsa_ms") else None
        pct = lambda x: None if x is None else 100 * x
        lines.append(f"| {r['HQ']} x {r['H']} | {r['context'] // 1024}k | {r['B']} | {fmt(r.get('nsa_ms'))} | "
                     f"{fmt(r.get('nsa_us_per_token'), '.1f')} | {fmt(r.get('dense_ms'))} | {fmt(speedup, '.2f')}"
                     f"{'x' if speedup else ''} | "
                     f"{r['nsa_bytes_per_token'] / 1e6:.2f} | {r['dense_bytes_per_token'] / 1e6:.2f} | "
                     f"{r['dense_bytes_per_token'] / r['nsa_bytes_per_token']:.1f}x | "
                     f"{fmt(pct(r.get('nsa_hbm_fraction')), '.0f')} | {fmt(pct(r.get('dense_hbm_fraction')), '.0f')} | "
                     f"{r['dense_backend']} |" + (f" {r['nsa_error']}" if r.get("nsa_error") else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["64x4", "32x8"], help="query heads x KV heads")
    parser.add_argument("--dim", type=int, default=128, help="head dim (keys and values)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth in TB/s (H200: 4.8, H100: 3.35)")
    parser.add_argument("--cuda-graph", action="store_true", help="time replays of captured CUDA graphs")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA GPU")
    for shape in args.shapes:
        parts = shape.split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) % int(parts[1]):
            raise SystemExit(f"--shapes {shape!r}: expected HQxH with HQ a multiple of H, e.g. 64x4")
    result = run(args)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}, bf16, D={args.dim}, "
          f"cuda graph: {args.cuda_graph}, HBM {args.hbm_tbps} TB/s")
    print(table(result))


if __name__ == "__main__":
    main()
