"""Context-parallel NSA benchmark: one attention layer, forward+backward, per rank, on the GPUs of one host.

Launch with one process per GPU (NCCL):

    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --seqlens 131072 262144 --out benchmarks/results/cp
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --documents 8 --layout per_document   # packed

``--documents N`` packs N documents of unequal lengths (proportional to 1, 2, ..., N, each a multiple of 2P) into
each sequence; ``--layout`` splits it as a whole (``zigzag``, ``contiguous``) or document by document
(``per_document``, megatron-core's split of packed ``thd`` batches), so the two can be compared on the same batch.
``--device cpu`` runs the same cases on gloo CPU ranks with the reference ops (tiny shapes; a check that the
benchmark runs, not a measurement).

For each total length T (B = 1, HQ 64, H 4, D 128, bf16, paper geometry, "mlp" compressors, no rotary) it
times, with CUDA events around forward+backward (median of ``--iters`` after warm-up, all ranks in step):

* ``single GPU``: ``nsa_attention`` on the whole sequence on rank 0 (the other ranks wait);
* ``CP=P sparse``: :func:`nsa_dist.parallel.context_parallel_nsa` fetching only the selected remote blocks;
* ``CP=P allgather``: the same with an all-gather of the raw selection K/V;
* ``dense CP``: :func:`nsa_dist.parallel.dense.allgather_dense_attention`, an all-gather of K/V (reduce-scatter
  of their gradients) and dense causal SDPA of the local zigzag chunks (cuDNN when it accepts the bottom-right
  causal mask, else the backend torch picks; the table says which).

Bytes per rank come from the layer's :class:`~nsa_dist.parallel.CPStats` (forward; backward moves the same in
the other direction) and, for dense CP, from the gathered K/V size. Peak memory is
``torch.cuda.max_memory_allocated`` of the case. Two input patterns (``--patterns``): ``random`` (i.i.d.
normal q/k, so selections scatter over the whole past) and ``local`` (q and k share a slowly rotating
position code, so a query's compressed scores peak on nearby blocks: the locality a trained model's
selections mostly show).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

import nsa_kernels
from nsa_kernels import NSAGeometry
from nsa_dist.compression import BlockCompressor
from nsa_dist.parallel import BranchKV, CPLayout, ShardedSequence, context_parallel_nsa
from nsa_dist.parallel.layout import LAYOUTS
from nsa_dist.parallel.dense import allgather_dense_attention, causal_sdpa

try:  # run as a script (python benchmarks/...) or as a module
    from kernels import add_shape_arguments
except ImportError:
    from benchmarks.kernels import add_shape_arguments

GEOMETRY = NSAGeometry(block_len=32, stride=16, select_len=64, top_n=16, window=512, init_blocks=1, local_blocks=2)
KV_NAMES = ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win")  # the branches' raw K/V, in BranchKV order


def position_code(T: int, D: int, device, strength: float) -> torch.Tensor:
    """``[T, D]`` unit-scale code whose dot products ``code[t] . code[s]`` fall with ``|t - s|`` (sum of
    cosines at geometrically spaced wavelengths from 256 to 32k tokens), times ``strength``."""
    freqs = 2 * math.pi / torch.logspace(math.log10(256), math.log10(32768), D // 2, device=device)
    angle = torch.arange(T, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angle.cos(), angle.sin()], 1) * (strength / math.sqrt(D // 2))


def make_inputs(T: int, HQ: int, H: int, D: int, pattern: str, seed: int, device) -> Dict[str, torch.Tensor]:
    """Global inputs, identical on every rank (same seed): q, the three branches' raw K/V and the gates."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
    x = {"q": randn(1, T, HQ, D)}
    for name in KV_NAMES:
        x[name] = randn(1, T, H, D)
    if pattern == "local":
        code = position_code(T, D, device, strength=4.0 * math.sqrt(D))[None, :, None, :]
        x["q"] = x["q"] * 0.1 + code
        x["k_cmp"] = x["k_cmp"] * 0.1 + code
    x["gates"] = torch.rand(1, T, HQ, 3, generator=gen, device=device)
    return {k: v.to(torch.bfloat16) for k, v in x.items()}


def packed_documents(T: int, documents: int, P: int, device) -> Optional[torch.Tensor]:
    """int32 ``cu_seqlens`` of ``documents`` packed documents filling ``T`` tokens, lengths proportional to
    ``1, 2, ..., documents`` and each a multiple of ``2P`` (as the ``per_document`` layout needs); None for one
    document. ValueError when ``T`` has fewer than ``documents`` units of ``2P`` tokens."""
    if documents == 1:
        return None
    units, weights = T // (2 * P), range(1, documents + 1)
    if T % (2 * P) or units < documents:
        raise ValueError(f"--documents {documents} needs T={T} to be a multiple of 2P={2 * P} with at least "
                         f"{documents} such units")
    lengths = [max(1, units * w // sum(weights)) for w in weights]
    lengths[-1] += units - sum(lengths)
    bounds = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0) * (2 * P)
    return bounds.to(device=device, dtype=torch.int32)


def timed(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor], iters: int, warmup: int = 2) -> Dict:
    """Median forward+backward ms (CUDA events on a GPU, the wall clock on the CPU; every rank synchronised per
    iteration) and the GPU's peak memory (None on the CPU)."""
    cuda = leaves[0].is_cuda
    grad = None
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        for t in leaves:
            t.grad = None
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        out = fn()
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        if cuda:
            end.record()
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) if cuda else (time.perf_counter() - begin) * 1e3)
    return {"fwd+bwd ms": statistics.median(times),
            "peak GiB": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}


def leaves_of(x: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in x.items()}


def single_gpu_case(x, compress_k, compress_v, cu_seqlens: Optional[torch.Tensor]):
    """Whole-sequence NSA on this GPU (the packed documents of ``cu_seqlens``, or one)."""
    def run():
        k_cmp, v_cmp = compress_k(x["k_cmp"], cu_seqlens), compress_v(x["v_cmp"], cu_seqlens)
        return nsa_kernels.nsa_attention(x["q"], k_cmp, v_cmp, x["k_slc"], x["v_slc"], x["k_win"], x["v_win"],
                                         x["gates"], **GEOMETRY._asdict(), cu_seqlens=cu_seqlens)
    return run


def cp_case(x, shards, group, compress_k, compress_v, exchange: str, stats_out: List):
    def run():
        o, stats = context_parallel_nsa(
            x["q"], BranchKV(*(x[n] for n in KV_NAMES)), x["gates"], geometry=GEOMETRY, shards=shards, group=group,
            compress_k=compress_k, compress_v=compress_v, selection_exchange=exchange)
        stats_out[:] = [stats]
        return o
    return run


def dense_cp_case(x, shards: ShardedSequence, group, backend_used: List):
    """:func:`nsa_dist.parallel.dense.allgather_dense_attention`: all-gather K/V (autograd: reduce-scatter
    backward), dense causal SDPA of each local chunk against the keys up to its end (bottom-right aligned causal
    mask), on cuDNN when it accepts the mask, else the backend torch picks (``backend_used`` says which)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v, scale=None):
        for name, backends in (("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("default", None)):
            try:
                if backends is None:
                    out = causal_sdpa(q, k, v, scale)
                else:
                    with sdpa_kernel(backends):
                        out = causal_sdpa(q, k, v, scale)
                backend_used[:] = [name]
                return out
            except RuntimeError:
                continue
        raise RuntimeError("no SDPA backend accepted the lower-right causal mask")

    def run():
        return allgather_dense_attention(x["q"], x["k_slc"], x["v_slc"], shards=shards, group=group, attend=attend)
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[131072, 262144])
    add_shape_arguments(parser)
    parser.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    parser.add_argument("--documents", type=int, default=1, help="packed documents per sequence (see above)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--patterns", nargs="+", default=["local", "random"], choices=["local", "random"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-single", action="store_true", help="skip the single-GPU baseline")
    parser.add_argument("--out", default=None, help="write <out>.json (rank 0)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/context_parallel.py needs CUDA GPUs (launch with torchrun), or --device cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, P = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device(args.device)
    HQ, H, D = args.heads, args.kv_heads, args.dim
    compress_k = BlockCompressor("mlp", D, GEOMETRY.block_len, GEOMETRY.stride, 2 * D).to(device, torch.bfloat16)
    compress_v = BlockCompressor("mlp", D, GEOMETRY.block_len, GEOMETRY.stride, 2 * D).to(device, torch.bfloat16)
    rows = []

    def record(row):
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), file=sys.stderr, flush=True)

    for T in args.seqlens:
        cu_seqlens = packed_documents(T, args.documents, P, device)
        shards = ShardedSequence(CPLayout(P, T, args.layout, GEOMETRY.select_len), cu_seqlens)
        layout = shards.layout  # per_document: bound to the documents
        for pattern in args.patterns:
            glob = make_inputs(T, HQ, H, D, pattern, seed=T, device=device)
            local = {k: layout.shard(v, rank) for k, v in glob.items()}
            base = {"T": T, "pattern": pattern, "P": P, "layout": args.layout, "documents": args.documents}
            if not args.skip_single and pattern == args.patterns[0]:
                x = leaves_of(glob) if rank == 0 else None
                fn = single_gpu_case(x, compress_k, compress_v, cu_seqlens) if rank == 0 else None
                res = timed(fn, list(x.values()), args.iters) if rank == 0 else _idle(args.iters)
                record({**base, "method": "single GPU", **res})
                del x, fn
            for exchange in ("sparse", "allgather"):
                x, stats = leaves_of(local), []
                res = timed(cp_case(x, shards, None, compress_k, compress_v, exchange, stats), list(x.values()),
                            args.iters)
                st = stats[0].to_dict()
                record({**base, "method": f"CP={P} {exchange}", **res, "sent_bytes": st["sent_bytes"],
                        "received_bytes": st["received_bytes"], "unique_remote_blocks": st["unique_remote_blocks"],
                        "exchanges": st["exchanges"]})
                del x
            if pattern == args.patterns[0]:
                x, used = leaves_of({k: local[k] for k in ("q", "k_slc", "v_slc")}), []
                res = timed(dense_cp_case(x, shards, None, used), list(x.values()), args.iters)
                kv_bytes = (P - 1) * layout.local_len * H * 2 * D * 2
                record({**base, "method": f"dense CP={P} (all-gather K/V + SDPA {used[0] if used else '?'})",
                        **res, "sent_bytes": kv_bytes, "received_bytes": kv_bytes})
                del x
            del glob, local
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if rank == 0:
        print_table(rows)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
            Path(args.out).with_suffix(".json").write_text(json.dumps(
                {"device": name, "gpus": P, "HQ": HQ, "H": H, "D": D, "rows": rows}, indent=2))
    dist.destroy_process_group()


def _idle(iters: int, warmup: int = 2) -> Dict:
    """What a rank does while rank 0 times the single-GPU baseline: join its barriers."""
    for _ in range(warmup + iters):
        dist.barrier()
    return {}


def print_table(rows: List[Dict]) -> None:
    single = {r["T"]: r["fwd+bwd ms"] for r in rows if r["method"] == "single GPU"}
    print("| T | documents | layout | pattern | method | fwd+bwd ms | vs single GPU | sent MiB/rank | "
          "received MiB/rank | unique remote blocks | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r.get("fwd+bwd ms")
        ratio = f"{ms / single[r['T']]:.2f}x" if ms and r["T"] in single else "-"
        mib = lambda k: f"{r[k] / 2 ** 20:.1f}" if k in r else "-"
        peak = "-" if r["peak GiB"] is None else f"{r['peak GiB']:.1f}"
        print(f"| {r['T'] / 1024:g}k | {r['documents']} | {r['layout']} | {r['pattern']} | {r['method']} | {ms:.1f} | "
              f"{ratio} | {mib('sent_bytes')} | {mib('received_bytes')} | {r.get('unique_remote_blocks', '-')} | "
              f"{peak} |")


if __name__ == "__main__":
    main()
