"""Tiny GPTs in their three attention layouts and their transformers copies, for the tests of ``nsa_dist.hf``."""
from __future__ import annotations

import torch

from nsa_dist import GPT
from tests.inference.cases import tiny_gpt

# NSA with shared K/V and max-logit block scoring, the paper's NSA (separate K/V, compressed scoring), dense
LAYOUTS = {
    "nsa-shared-max-logit": dict(attention="nsa", kv_sharing="shared", selection_scoring="max_logit"),
    "nsa-paper": dict(attention="nsa"),
    "dense": dict(attention="dense"),
}


def layout_gpt(layout: str, seed: int = 0) -> GPT:
    """A random tiny GPT (:func:`tests.inference.cases.tiny_gpt`, vocab 50) of one of :data:`LAYOUTS`, eval mode."""
    return tiny_gpt(seed=seed, **LAYOUTS[layout])


def hf_copy(gpt: GPT):
    """An ``NSAGPTForCausalLM`` of ``gpt``'s config holding its weights, in eval mode."""
    from nsa_dist.hf import NSAGPTConfig, NSAGPTForCausalLM

    model = NSAGPTForCausalLM(NSAGPTConfig.from_gpt_config(gpt.config))
    model.model.load_state_dict(gpt.state_dict())
    return model.eval()


def prompts(lengths, vocab: int = 50, seed: int = 0):
    """Random prompts of ``lengths`` tokens: (right-padded ``[B, T]`` with their lengths, left-padded ``[B, T]``
    with its ``attention_mask``); padding ids are 0."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    B, T = len(lengths), int(lengths.max())
    right = torch.zeros(B, T, dtype=torch.long)
    left = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        ids = torch.randint(1, vocab, (n,), generator=generator)
        right[b, :n] = ids
        left[b, T - n:] = ids
        mask[b, T - n:] = 1
    return right, lengths, left, mask
