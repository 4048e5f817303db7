"""Bytes per rank of NSA's two sequence-parallel exchanges, from a CPU run: Ulysses (all-to-all over heads) and
context parallelism (compressed K/V, selected blocks, halos), alone and combined, on 4 local gloo ranks.

    python benchmarks/sequence_parallel_bytes.py --seqlens 2048 4096 8192

One :class:`~nsa_dist.NativeSparseAttention` layer (random weights, float32, paper geometry l 32, d 16, l' 64,
n 16, w 512, ``cp_selection_exchange="auto"``) runs one forward on ``x`` of i.i.d. normal rows for each grid
``CP x U`` of 4 ranks; the table gives the bytes each rank sent in the forward pass (mean over ranks; backward
sends the same again in the opposite direction), from the layer's :class:`~nsa_dist.parallel.UlyssesStats` and
:class:`~nsa_dist.parallel.CPStats`. Random inputs scatter the selections over the whole past, the worst case
for the context-parallel selection exchange (a trained model's selections are mostly local). bf16 halves every
tensor's bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsa_dist import NativeSparseAttention, NSAConfig  # noqa: E402
from nsa_dist.deepspeed.groups import ContextDataParallelGroups  # noqa: E402
from nsa_dist.launch import run_local_group  # noqa: E402
from nsa_dist.training import ContextParallelGroup  # noqa: E402

WORLD = 4
GRIDS = ((WORLD, 1), (1, WORLD), (2, 2))  # (CP, U)


def layer_config(args) -> NSAConfig:
    return NSAConfig(hidden_size=args.heads * args.head_dim, num_heads=args.heads, num_kv_heads=args.kv_heads,
                     head_dim=args.head_dim, use_rope=False)


def rank_bytes(rank: int, world: int, args, T: int, cp: int, ulysses: int) -> Dict:
    """This rank's forward bytes sent by each mechanism for one layer call on a ``[1, T]`` sequence, and the
    selection path the context-parallel exchange took."""
    groups = ContextDataParallelGroups(cp, "cpu", ulysses)
    sequence = ContextParallelGroup.of_grid(groups, "zigzag", 64)
    torch.manual_seed(0)
    cfg = layer_config(args)
    layer = NativeSparseAttention(cfg, cp_group=sequence.group, ulysses_group=sequence.ulysses_group)
    x = torch.randn(1, T, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(sequence.shard(x))
    stats = {"ulysses_bytes": layer.last_ulysses_stats, "cp_bytes": layer.last_cp_stats}
    path = {"path": layer.last_cp_stats.selection_path if layer.last_cp_stats else "-"}
    return {**path, **{name: s.sent_bytes if s is not None else 0 for name, s in stats.items()}}


def measure(rank: int, world: int, args) -> List[Dict]:
    rows = []
    for T in args.seqlens:
        for cp, ulysses in GRIDS:
            rows.append({"T": T, "cp": cp, "ulysses": ulysses, **rank_bytes(rank, world, args, T, cp, ulysses)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    per_rank = run_local_group(measure, WORLD, args, threads=max(1, (os.cpu_count() or 1) // WORLD))
    print(f"HQ {args.heads}, H {args.kv_heads}, D {args.head_dim}, float32, {WORLD} ranks: forward MiB sent per "
          "rank (mean over ranks)")
    print("| T | CP x U | Ulysses all-to-all | CP exchanges | total | CP selection path |")
    print("|---|---|---|---|---|---|")
    for i, row in enumerate(per_rank[0]):
        mean = {k: sum(r[i][k] for r in per_rank) / WORLD / 2**20 for k in ("ulysses_bytes", "cp_bytes")}
        print(f"| {row['T']} | {row['cp']} x {row['ulysses']} | {mean['ulysses_bytes']:.2f} | "
              f"{mean['cp_bytes']:.2f} | {sum(mean.values()):.2f} | {row['path']} |")


if __name__ == "__main__":
    main()
