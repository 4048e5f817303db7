"""Bring your own model: a small transformer written here, not nsa-dist's GPT, with
:class:`nsa_dist.NativeSparseAttention` as its attention, trained with ``deepspeed.initialize`` under context
parallelism (CP) and data parallelism (DP).

What a user's model needs for CP, and nothing else:

- the ranks form ``DP x CP`` through :class:`nsa_dist.deepspeed.ContextDataParallelGroups`, which is also the
  ``mpu`` DeepSpeed reads them from (ZeRO partitions over every replica and sums gradients over CP);
- every NSA layer gets the CP group (``NativeSparseAttention(cfg, cp_group=groups.cp_group)``); embedding, norms
  and MLP act on each token alone and need no change (rotary positions are applied inside NSA, which knows the
  global position of each local token);
- every rank of a CP group draws the same batch and keeps its shard of each sequence in the layout the NSA layers
  expect (``NSAConfig.cp_layout``, zigzag by default), cut by
  :class:`nsa_dist.training.context_parallel.ContextParallelGroup`;
- each rank's loss is its shard's summed cross-entropy divided by the labelled tokens of the *whole* batch, so the
  ranks' losses (and DeepSpeed's gradient sum over CP) add up to the one-process values.

Run on 2 CPU processes (gloo, CP 2), or on GPUs with NCCL::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/deepspeed/own_model.py --cp 2
    torchrun --nproc-per-node 8 examples/deepspeed/own_model.py --cp 4 --config configs/deepspeed/zero3.json
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Dict, List, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_dist.deepspeed import (ContextDataParallelGroups, load_deepspeed_json, require_deepspeed,
                                sequence_parallel_loss_scale, unlink_cpu_allreduce_buffer)
from nsa_dist.training.context_parallel import ContextParallelGroup

REPO = Path(__file__).resolve().parents[2]
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"
# a small NSA: blocks of 8 tokens compressed at stride 4, the top 4 selection blocks of 8 tokens, a 16-token window
NSA = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, block_len=8, stride=4, select_len=8, top_n=4,
           window=16)


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm, NSA, RMSNorm, SwiGLU MLP, each with a residual connection."""

    def __init__(self, nsa: NSAConfig, cp_group=None):
        super().__init__()
        h = nsa.hidden_size
        self.attn_norm, self.mlp_norm = nn.RMSNorm(h), nn.RMSNorm(h)
        self.attn = NativeSparseAttention(nsa, cp_group=cp_group)
        self.gate_up = nn.Linear(h, 2 * 4 * h, bias=False)
        self.down = nn.Linear(4 * h, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLM(nn.Module):
    """Token embedding, ``layers`` :class:`Block` s, a final RMSNorm and an untied LM head. Under CP (``cp_group``)
    it takes this rank's shard ``[B, T / P]`` of the token ids and returns the logits of those tokens."""

    def __init__(self, vocab_size: int, layers: int, nsa: NSAConfig, cp_group=None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, nsa.hidden_size)
        self.blocks = nn.ModuleList(Block(nsa, cp_group) for _ in range(layers))
        self.norm = nn.RMSNorm(nsa.hidden_size)
        self.head = nn.Linear(nsa.hidden_size, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def deepspeed_config(path: Path, micro_batch: int, dp: int, lr: float) -> Dict:
    """A shipped DeepSpeed JSON (``configs/deepspeed/``) completed with what it leaves to the job: batch sizes and
    learning rate. bf16 is turned off (the CPU runs in float32) and the scheduler dropped: a few steps at a constant
    rate (the JSONs' WarmupCosineLR would start its warm-up at rate 0)."""
    ds = load_deepspeed_json(str(path))
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
              train_batch_size=micro_batch * dp, bf16={"enabled": False})
    ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})["params"]["lr"] = lr
    ds.pop("scheduler", None)
    return ds


def init_distributed() -> torch.device:
    """torch.distributed from the launcher's environment (NCCL on GPUs, else gloo), unless already set up, e.g. by
    nsa-dist's local spawner (:func:`nsa_dist.launch.run_local_group`, all ranks on this host), where
    ``LOCAL_RANK``, which ``deepspeed.initialize`` asserts, is set to the rank; the device of this rank."""
    import deepspeed

    cuda = torch.cuda.is_available()
    if dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    else:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        unlink_cpu_allreduce_buffer()  # DeepSpeed's CPU all-reduce buffers would outlive the job in /dev/shm
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def train(cp: int, steps: int = 5, seed: int = 0, seq_len: int = 64, micro_batch: int = 2, vocab_size: int = 64,
          layers: int = 2, lr: float = 1e-2, ds_config: Union[Path, Dict] = ZERO2, use_cp_group: bool = True,
          verbose: bool = True) -> Dict[str, List[float]]:
    """Train :class:`TinyLM` for ``steps`` steps with DeepSpeed on every rank of the process group, ``cp`` ranks
    sharing each sequence; each DP rank repeats one random batch of ``micro_batch`` sequences of ``seq_len``
    tokens (so the loss falls as the model memorizes it).

    Args:
        ds_config: a DeepSpeed JSON, completed by :func:`deepspeed_config`, or a complete config dict.
        use_cp_group: give the NSA layers the CP group (False only to show what goes wrong without it).
    Returns:
        ``loss``: the mean loss of each step over the whole batch (every rank returns the same), and
        ``nsa_grad_norm``: the norm of the NSA parameters' full gradient at each step (DeepSpeed's
        ``safe_get_full_grad``, after the reduction over ranks).
    """
    require_deepspeed()
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    device = init_distributed()
    groups = ContextDataParallelGroups(cp, device.type)
    nsa = NSAConfig(**NSA)
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = TinyLM(vocab_size, layers, nsa, groups.cp_group if use_cp_group and cp > 1 else None).to(device)
    config = ds_config if isinstance(ds_config, dict) else deepspeed_config(ds_config, micro_batch, groups.dp, lr)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                           mpu=groups, dist_init_required=False)
    shards = ContextParallelGroup(groups.cp_group if cp > 1 else None, nsa.cp_layout, nsa.select_len)
    loss_scale = sequence_parallel_loss_scale(config, cp)  # ZeRO-3 averages over the CP ranks: scale back to a sum
    sequence = torch.randint(vocab_size, (micro_batch, seq_len + 1),
                             generator=torch.Generator().manual_seed(seed * 1009 + groups.dp_rank))
    tokens, targets = (shards.shard(t).to(device) for t in (sequence[:, :-1], sequence[:, 1:]))
    nsa_params = [p for name, p in engine.module.named_parameters() if ".attn." in name]
    history: Dict[str, List[float]] = {"loss": [], "nsa_grad_norm": []}
    for step in range(steps):
        logits = engine(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / targets.numel()
        loss = loss / shards.world_size  # this rank's share: the shards' losses add up to the batch's mean
        engine.backward(loss * loss_scale)
        history["nsa_grad_norm"].append(math.sqrt(sum(float(safe_get_full_grad(p).double().square().sum())
                                                      for p in nsa_params)))
        engine.step()
        value = shards.sum(loss.detach().clone())
        dist.all_reduce(value, group=groups.dp_group)  # mean over the DP ranks' batches
        history["loss"].append(value.item() / groups.dp)
        if verbose and groups.rank == 0:
            print(f"step {step + 1}: loss {history['loss'][-1]:.4f} (DP {groups.dp} x CP {groups.cp})", flush=True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cp", type=int, default=2, help="ranks sharing each sequence (divides the world size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (a multiple of 2 * cp * 8)")
    parser.add_argument("--config", type=Path, default=ZERO2, help="a DeepSpeed JSON, e.g. configs/deepspeed/*.json")
    args = parser.parse_args()
    train(args.cp, args.steps, seq_len=args.seq_len, ds_config=args.config)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
