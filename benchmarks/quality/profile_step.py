"""Step time of the quality model, measured alone: ms per training step for variants and lengths side by side,
by training phase, and optionally where the step's GPU time goes (torch.profiler, CUDA time per op).

    python benchmarks/quality/profile_step.py --seq-lens 4096 32768 --variants dense nsa nsa-recipe --out t.json
    python benchmarks/quality/profile_step.py --seq-lens 16384 --variants nsa --profile

For each length and variant: the experiment's model, batch (``--tokens-per-step / T`` sequences) and bf16
precision (``settings.py``), two warm-up steps, then ``--steps`` timed steps (forward, backward, AdamW). Variants
with a full-selection warm-up are timed in both phases (``full selection``: the selected branch attends every
block; ``main``: top-n), the others in ``main``. Prints a table with each row's ratio to dense at the same length
(when ``dense`` is among the variants) and writes the rows as JSON to ``--out``. This is where the quality runs'
step times come from when ``experiment.py --jobs`` trained several runs at once.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from settings import MODEL_SIZES, VARIANTS, train_config  # noqa: E402

from nsa_dist.models import GPT  # noqa: E402
from nsa_dist.selection_warmup import set_full_selection  # noqa: E402
from nsa_dist.training import ContextParallelGroup, TrainConfig  # noqa: E402
from nsa_dist.training.data import make_dataset  # noqa: E402
from nsa_dist.training.loss import batch_loss  # noqa: E402


def phases(variant: str) -> List[str]:
    """The training phases of ``variant`` at the target length: ``"full selection"`` first where it has a
    full-selection warm-up, then ``"main"``."""
    warmup = VARIANTS[variant].get("nsa", {}).get("selection_warmup_steps", 0)
    return (["full selection"] if warmup else []) + ["main"]


def time_steps(seq_len: int, variant: str, phase: str, *, size: str, tokens_per_step: int, steps: int,
               profile_rows: int = 0) -> Dict:
    """``{"seq_len", "variant", "phase", "batch", "ms_per_step"}``: the mean wall time of ``steps`` training steps
    after two warm-up steps; with ``profile_rows`` the steps run under torch.profiler and its table (that many
    ops, by CUDA self time) is printed."""
    config = TrainConfig.from_dict(train_config("needle", seq_len, variant, size=size, steps=10,
                                                tokens_per_step=tokens_per_step, lr=1e-3, seed=0, precision="bf16",
                                                text_file=None, out_dir="/tmp/profile_step"))
    dev = torch.device("cuda")
    dataset = make_dataset(config)
    model = GPT(config.gpt_config(dataset.vocab_size)).to(dev)
    set_full_selection(model, phase == "full selection")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = dataset.sample(config.train.batch_size, seq_len, torch.Generator().manual_seed(0))
    cp = ContextParallelGroup()

    def step():
        loss = batch_loss(model, batch, dev, cp, "bf16")[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # compile and warm up
        step()
    torch.cuda.synchronize()
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if profile_rows else None
    start = time.perf_counter()
    with prof if prof is not None else contextlib.nullcontext():
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - start) / steps
    if prof is not None:
        print(f"{variant} T={seq_len} {phase}: {ms:.1f} ms/step (profiled)")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=profile_rows,
                                        max_name_column_width=60))
    del model, optimizer
    torch.cuda.empty_cache()
    return {"seq_len": seq_len, "variant": variant, "phase": phase, "batch": config.train.batch_size,
            "ms_per_step": ms}


def table(rows: List[Dict]) -> str:
    """Markdown table of ``rows`` with each row's ratio to dense's ``main`` step at the same length."""
    dense = {r["seq_len"]: r["ms_per_step"] for r in rows if r["variant"] == "dense"}
    lines = ["| T | variant | phase | sequences/step | ms/step | / dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        base: Optional[float] = dense.get(r["seq_len"])
        lines.append(f"| {r['seq_len']:,} | {r['variant']} | {r['phase']} | {r['batch']} | {r['ms_per_step']:.1f} | "
                     + (f"{r['ms_per_step'] / base:.2f} |" if base else "- |"))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", required=True)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["dense", "nsa"])
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table for every row")
    parser.add_argument("--rows", type=int, default=25, help="ops in each profiler table")
    parser.add_argument("--out", type=Path, help="JSON file for the rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py times CUDA steps: it needs a GPU")
    rows = []
    for seq_len in args.seq_lens:
        for variant in args.variants:
            for phase in phases(variant):
                rows.append(time_steps(seq_len, variant, phase, size=args.size, tokens_per_step=args.tokens_per_step,
                                       steps=args.steps, profile_rows=args.rows if args.profile else 0))
                print(f"{variant} T={seq_len} {phase}: {rows[-1]['ms_per_step']:.1f} ms/step", flush=True)
    print(table(rows))
    if args.out:
        import triton

        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.date.today().isoformat()}
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
