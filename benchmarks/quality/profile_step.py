"""Where one training step of the quality model goes: torch.profiler over a few steps, CUDA time per op.

    python benchmarks/quality/profile_step.py --seq-len 16384 --variant nsa --steps 3

Prints the ops with the most device time (self time, summed over the profiled steps) and the step's wall time;
the model, batch and precision are the experiment's (``settings.py``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from settings import MODEL_SIZES, VARIANTS, train_config  # noqa: E402

from nsa_dist.models import GPT  # noqa: E402
from nsa_dist.training.data import make_dataset  # noqa: E402
from nsa_dist.training.loss import batch_loss  # noqa: E402
from nsa_dist.training import ContextParallelGroup  # noqa: E402
from nsa_dist.training import TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="nsa")
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py profiles CUDA time: it needs a GPU")
    config = TrainConfig.from_dict(train_config("needle", args.seq_len, args.variant, size=args.size, steps=10,
                                                tokens_per_step=args.tokens_per_step, lr=1e-3, seed=0,
                                                precision="bf16", text_file=None, out_dir="/tmp/profile_step"))
    dev = torch.device("cuda")
    dataset = make_dataset(config)
    model = GPT(config.gpt_config(dataset.vocab_size)).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch = dataset.sample(config.train.batch_size, args.seq_len, gen)
    cp = ContextParallelGroup()

    def step():
        loss = batch_loss(model, batch, dev, cp, "bf16")[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # compile and warm up
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    print(f"{args.variant} T={args.seq_len} batch {config.train.batch_size}: {1e3 * wall:.1f} ms/step (profiled)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
