"""Peak memory of the LM head and cross-entropy, forward and backward, for one rank's tokens: the full logits
against the chunked loss (:func:`nsa_dist.training.loss.chunked_head_loss`, ``train.loss_chunk_tokens``).

Without a GPU the peak is *counted*, not measured: the loss runs on fake tensors (``FakeTensorMode``: shapes and
dtypes, no storage), and torch's ``MemTracker`` adds up every tensor alive at each moment, as the GPU's caching
allocator would hand them out (without its rounding, fragmentation and the cuBLAS workspace). ``--measure`` also
runs it for real on the GPU and reports ``torch.cuda.max_memory_allocated`` above the inputs, beside the count.

    python benchmarks/loss_memory.py                                 # 128k tokens, hidden 2048, vocab 128k, bf16
    python benchmarks/loss_memory.py --measure --out benchmarks/results/loss-memory.json   # on a GPU

Inputs (not counted in "loss peak"): the hidden states ``[T, hidden]`` and the head weight ``[vocab, hidden]``;
their gradients are counted, as the backward allocates them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from nsa_dist.training.loss import chunked_head_loss, summed_loss_and_correct

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2 ** 30


def loss_step(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> None:
    """Forward and backward of the summed cross-entropy of ``hidden [T, hidden] @ weight.T`` against ``targets
    [T]``: all logits at once for ``chunk_tokens = 0``, else :func:`chunked_head_loss` in chunks of that many."""
    head = lambda h: F.linear(h, weight)  # noqa: E731  (a function, not a module: one call per chunk)
    if chunk_tokens:
        loss, _ = chunked_head_loss(head, hidden, targets, chunk_tokens)
    else:
        loss, _ = summed_loss_and_correct(head(hidden), targets)
    loss.backward()


def inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device) -> List[torch.Tensor]:
    """Head weight, hidden states (both requiring grad) and targets, uninitialised (only their memory matters)."""
    weight = torch.empty(vocab, hidden, dtype=dtype, device=device, requires_grad=True)
    states = torch.empty(tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    return [weight, states, torch.zeros(tokens, dtype=torch.long, device=device)]


def counted_peak_gib(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, chunk_tokens: int) -> float:
    """GiB alive at the peak of :func:`loss_step` above its inputs, counted on fake tensors by ``MemTracker``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        tensors = inputs(tokens, hidden, vocab, dtype, "cpu")
        tracker = MemTracker()
        tracker.track_external(*tensors)
        with tracker:
            loss_step(*tensors, chunk_tokens)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return (peak - sum(t.numel() * t.element_size() for t in tensors)) / GIB


def measured_peak_gib(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, chunk_tokens: int) -> float:
    """GiB of ``torch.cuda.max_memory_allocated`` above the inputs during :func:`loss_step` on this GPU."""
    tensors = inputs(tokens, hidden, vocab, dtype, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss_step(*tensors, chunk_tokens)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del tensors
    torch.cuda.empty_cache()
    return peak / GIB


def run(tokens: int, hidden: int, vocab: int, dtype: str, chunks: List[int], measure: bool) -> List[Dict]:
    """One row per chunk size (0: the full logits): the counted peak, and the measured one with ``measure``
    (None where it ran out of GPU memory)."""
    rows = []
    for chunk in chunks:
        row: Dict[str, Optional[float]] = {"chunk_tokens": chunk,
                                           "counted_gib": counted_peak_gib(tokens, hidden, vocab, DTYPES[dtype], chunk)}
        if measure:
            try:
                row["measured_gib"] = measured_peak_gib(tokens, hidden, vocab, DTYPES[dtype], chunk)
            except torch.OutOfMemoryError:
                row["measured_gib"] = None
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def table(rows: List[Dict]) -> str:
    """Markdown table of :func:`run`'s rows."""
    measured = any("measured_gib" in r for r in rows)
    head = "| loss | counted peak GiB |" + (" measured peak GiB |" if measured else "")
    lines = [head, "|---|---|" + ("---|" if measured else "")]
    for r in rows:
        name = f"chunked, {r['chunk_tokens']} tokens" if r["chunk_tokens"] else "full logits"
        line = f"| {name} | {r['counted_gib']:.2f} |"
        if measured:
            line += " out of memory |" if r.get("measured_gib") is None else f" {r['measured_gib']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072, help="one rank's tokens")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="hidden states, head and logits")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16384, 8192, 4096, 2048],
                        help="chunk sizes in tokens (0: the full logits)")
    parser.add_argument("--measure", action="store_true", help="also run on the GPU and measure the peak")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if args.measure and not torch.cuda.is_available():
        raise SystemExit("--measure needs a CUDA GPU")
    rows = run(args.tokens, args.hidden, args.vocab, args.dtype, args.chunks, args.measure)
    print(f"{args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}"
          + (f", {torch.cuda.get_device_name()}" if args.measure else ", counted on fake tensors"))
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**vars(args), "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
