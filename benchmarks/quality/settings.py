"""What the quality experiment trains: model sizes, attention variants (NSA, dense, NSA ablations) and the
tasks (multi-needle retrieval in several settings, byte-level LM), as :class:`~nsa_dist.training.TrainConfig` dictionaries.

Every variant of a task and length shares the data (same seed, so the same batches), steps, batch, optimizer and
schedule; only the model's attention differs."""
from __future__ import annotations

import copy
from typing import Any, Dict


# NSA paper geometry (l 32, d 16, l' 64, n 16, w 512, MLP compressor) in every NSA variant but the ablated field
PAPER_NSA = dict(block_len=32, stride=16, select_len=64, top_n=16, window=512, compressor="mlp")

MODEL_SIZES: Dict[str, Dict[str, Any]] = {
    # the measured size: 4 layers, hidden 512, 16 query heads over 4 KV heads (G = 4), head dim 64
    "small": dict(hidden_size=512, num_layers=4, num_heads=16, num_kv_heads=4, head_dim=64, rope_theta=500000.0,
                  nsa=PAPER_NSA),
    # CPU smoke tests only: the same structure, scaled down (geometry l 8, d 4, l' 16, n 4, w 32)
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 nsa=dict(block_len=8, stride=4, select_len=16, top_n=4, window=32, compressor="mlp")),
}

VARIANTS: Dict[str, Dict[str, Any]] = {
    "nsa": {},
    "dense": {"attention": "dense"},
    "nsa-no-compressed": {"nsa": {"disabled_branches": ["compressed"]}},
    "nsa-no-selected": {"nsa": {"disabled_branches": ["selected"]}},
    "nsa-no-window": {"nsa": {"window": 0}},
    "nsa-mean-pool": {"nsa": {"compressor": "mean"}},
    # learned softmax pooling (mean at the start, up to max pooling): a needle token's key is not diluted 32-fold
    "nsa-softmax-pool": {"nsa": {"compressor": "softmax"}},
    # the selection (indexer) loss of nsa_dist.selection_loss at two weights
    "nsa-sel0.1": {"nsa": {"selection_loss_weight": 0.1}},
    "nsa-sel1": {"nsa": {"selection_loss_weight": 1.0}},
    # one K/V projection for all branches: the window's keys, trained on the short phase where the window covers
    # the sequence, are then the selection keys, so the loss's teacher already points at the needle
    "nsa-shared": {"nsa": {"kv_sharing": "shared"}},
    "nsa-shared-sel1": {"nsa": {"kv_sharing": "shared", "selection_loss_weight": 1.0}},
    "nsa-shared-sel10": {"nsa": {"kv_sharing": "shared", "selection_loss_weight": 10.0}},
    # every row of a 4k sequence in the loss (the needle task's 16 answer rows are ~1 of 256 sampled rows)
    "nsa-shared-sel1-rows4k": {"nsa": {"kv_sharing": "shared", "selection_loss_weight": 1.0,
                                       "selection_loss_rows": 4096}},
    # full-selection warm-up (nsa_dist.selection_warmup) over the first 600 or 800 steps of the 1000-step
    # protocol (400 short + 200 / 400 long): the selected branch attends every block while the selection loss
    # teaches the block scores; then top-n
    "nsa-warmup600": {"nsa": {"selection_warmup_steps": 600}},
    "nsa-warmup600-sel1": {"nsa": {"selection_warmup_steps": 600, "selection_loss_weight": 1.0}},
    "nsa-warmup800-sel1": {"nsa": {"selection_warmup_steps": 800, "selection_loss_weight": 1.0}},
    "nsa-softmax-warmup600-sel1": {"nsa": {"compressor": "softmax", "selection_warmup_steps": 600,
                                           "selection_loss_weight": 1.0}},
    # blocks ranked by an upper bound of the selected branch's logits (nsa_dist.key_bound_selection), alone and
    # after a full-selection warm-up
    "nsa-key-bound": {"nsa": {"selection_scoring": "key_bound"}},
    "nsa-key-bound-warmup600": {"nsa": {"selection_scoring": "key_bound", "selection_warmup_steps": 600}},
    "nsa-key-bound-shared": {"nsa": {"selection_scoring": "key_bound", "kv_sharing": "shared"}},
    # the recipe with one K/V for all branches, and with a longer full-selection warm-up
    "nsa-key-bound-shared-warmup600": {"nsa": {"selection_scoring": "key_bound", "kv_sharing": "shared",
                                               "selection_warmup_steps": 600}},
    "nsa-key-bound-warmup800": {"nsa": {"selection_scoring": "key_bound", "selection_warmup_steps": 800}},
    # blocks ranked by the selected branch's exact largest logit in each block (nsa_dist.max_logit_selection):
    # with the recipe's shared K/V and warm-up, and with each of those two removed
    "nsa-max-logit-shared-warmup600": {"nsa": {"selection_scoring": "max_logit", "kv_sharing": "shared",
                                               "selection_warmup_steps": 600}},
    "nsa-max-logit-warmup600": {"nsa": {"selection_scoring": "max_logit", "selection_warmup_steps": 600}},
    "nsa-max-logit-shared": {"nsa": {"selection_scoring": "max_logit", "kv_sharing": "shared"}},
}
# the retrieval recipe, the best combination measured (H200, 2026-12-04: 99.6% at 4k and 96.6% at 16k over 3
# seeds): key-bound scoring, one K/V for all branches and a 600-step full-selection warm-up, i.e. nsa.recipe:
# "retrieval" (nsa_dist.recipes) at 1000 steps. "nsa-recipe" is its alias: report.py reads runs of the alias as
# runs of RECIPE and names RECIPE "nsa-recipe" in the retrieval summary.
RECIPE = "nsa-key-bound-shared-warmup600"
VARIANTS["nsa-recipe"] = VARIANTS[RECIPE]

# needles: 16 per sequence at every length, each one token standing for its (key, value) pair (RetrievalTask's
# fused form: one attention hop retrieves it), keys and values from 16 each (chance accuracy 1/16), filler from
# 256 tokens; queried at the end as QUERY key value
NEEDLE_TASK = dict(num_pairs=16, num_keys=16, num_values=16, num_filler=256, fused=True)
# the measured needle setting and the others a recipe must also match dense on: fewer and more pairs, more keys
# and values (chance 1/64), a 16x larger filler vocabulary. "needle-64pairs" needs sequences of at least 320
# tokens (5 per pair), so its curriculum starts at --short-seq-len 512.
NEEDLE_TASKS: Dict[str, Dict[str, Any]] = {
    "needle": NEEDLE_TASK,
    "needle-4pairs": {**NEEDLE_TASK, "num_pairs": 4},
    "needle-64pairs": {**NEEDLE_TASK, "num_pairs": 64, "num_keys": 64},
    "needle-64values": {**NEEDLE_TASK, "num_keys": 64, "num_values": 64},
    "needle-4k-filler": {**NEEDLE_TASK, "num_filler": 4096},
}
TASKS = (*NEEDLE_TASKS, "lm")


def model_section(size: str, variant: str) -> Dict[str, Any]:
    """The ``model`` section of ``size`` with ``variant``'s overrides (NSA fields merged)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model size {size!r} is not one of {sorted(MODEL_SIZES)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {sorted(VARIANTS)}")
    model = copy.deepcopy(MODEL_SIZES[size])
    overrides = copy.deepcopy(VARIANTS[variant])
    model["nsa"] = {**model.get("nsa", {}), **overrides.pop("nsa", {})}
    return {"attention": "nsa", **model, **overrides}


def data_section(task: str, seq_len: int, text_file: str | None) -> Dict[str, Any]:
    """The ``data`` section: a needle setting of ``NEEDLE_TASKS``, or bytes of ``text_file`` with a 5% held-out
    tail (``"lm"``)."""
    if task in NEEDLE_TASKS:
        return dict(kind="retrieval", seq_len=seq_len, retrieval=dict(NEEDLE_TASKS[task]))
    if task == "lm":
        if not text_file:
            raise ValueError("task 'lm' needs a text file (the experiment builds the stdlib corpus)")
        return dict(kind="text", seq_len=seq_len, text_file=text_file, valid_fraction=0.05)
    raise ValueError(f"task {task!r} is not one of {TASKS}")


def train_config(task: str, seq_len: int, variant: str, *, size: str, steps: int, tokens_per_step: int,
                 lr: float, seed: int, precision: str, text_file: str | None, out_dir: str,
                 short_seq_len: int | None = None, short_steps: int = 0) -> Dict[str, Any]:
    """A full training config dictionary (``TrainConfig.from_dict`` validates it): ``tokens_per_step / seq_len``
    sequences per step, AdamW with 5% warm-up and cosine decay to 10%, evaluation every tenth of the run; the
    first ``short_steps`` steps on ``short_seq_len``-token sequences (the same tokens per step), if given."""
    if tokens_per_step % seq_len:
        raise ValueError(f"tokens_per_step={tokens_per_step} is not a multiple of seq_len={seq_len}")
    data = data_section(task, seq_len, text_file)
    if short_seq_len is not None:
        data.update(short_seq_len=short_seq_len, short_steps=short_steps)
    return {
        "seed": seed, "out_dir": out_dir,
        "model": model_section(size, variant),
        "data": data,
        "train": dict(steps=steps, batch_size=tokens_per_step // seq_len, lr=lr, min_lr_ratio=0.1,
                      warmup_steps=max(1, steps // 20), weight_decay=0.1, grad_clip=1.0, eval_batches=4,
                      log_every=max(1, steps // 50), eval_every=max(1, steps // 10), precision=precision),
    }
