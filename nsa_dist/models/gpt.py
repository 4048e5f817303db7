"""A compact GPT (pre-norm, RMSNorm, SwiGLU, rotary) whose attention is NSA or dense SDPA."""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..attention import NativeSparseAttention
from ..compression import BlockCompressor
from nsa_kernels.validation import check_positive_int

from ..config import NSAConfig
from ..inference.generate import Generation, generate
from ..validation import check_bool, check_mapping, check_optional_positive_int, check_real, check_token_ids
from .dense import DenseAttention
from .layers import SwiGLU

ATTENTION_KINDS = ("nsa", "dense")


@dataclass
class GPTConfig:
    """Model shape. ``nsa`` holds NSA-specific overrides (``block_len``, ``window``, ``compressor``, ...)
    of :class:`NSAConfig`; the head layout comes from the fields here."""

    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    attention: str = "nsa"
    nsa: Dict[str, Any] = field(default_factory=dict)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            check_positive_int(name, getattr(self, name))
        for name in ("head_dim", "ffn_hidden_size"):
            check_optional_positive_int(name, getattr(self, name))
        check_real("rope_theta", self.rope_theta, 0, low_open=True)
        check_real("norm_eps", self.norm_eps, 0, low_open=True)
        check_real("init_std", self.init_std, 0, low_open=True)
        check_bool("tie_embeddings", self.tie_embeddings)
        check_mapping("model.nsa", self.nsa)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_KINDS}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                                 "set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if self.ffn_hidden_size is None:  # 8/3 * hidden rounded up to a multiple of 64, as Llama
            self.ffn_hidden_size = -(-int(8 * self.hidden_size / 3) // 64) * 64
        self.nsa_config()  # validate the NSA fields now, not at the first forward

    def nsa_config(self) -> NSAConfig:
        """The :class:`NSAConfig` of every NSA layer of this model."""
        return NSAConfig.from_dict({
            "hidden_size": self.hidden_size, "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta, **self.nsa}, where="model.nsa")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        if config.attention == "nsa":
            self.attn = NativeSparseAttention(config.nsa_config())
        else:
            self.attn = DenseAttention(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                       config.rope_theta)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def forward(self, x, cu_seqlens=None, position_ids=None):
        x = x + self.attn(self.attn_norm(x), cu_seqlens=cu_seqlens, position_ids=position_ids)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only language model: embedding, ``num_layers`` blocks, final RMSNorm, (tied) LM head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_linear)
        for module in self.modules():
            if isinstance(module, BlockCompressor):  # back to their mean-pooling start
                module.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # set by a trainer for activation checkpointing: checkpoint(function, x) recomputes a block in backward
        # (only x is passed: DeepSpeed's partitioned checkpointing mishandles non-tensor arguments such as None)
        self.checkpoint_blocks: Optional[Callable] = None

    def _init_linear(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, return_hidden: bool = False) -> torch.Tensor:
        """``tokens`` int ``[B, T]`` of ids in ``[0, vocab_size)`` (packed documents: ``B = 1`` with
        ``cu_seqlens``) -> logits ``[B, T, vocab]``, or with ``return_hidden`` the LM head's input ``[B, T, H]``
        (the final norm's output, for a loss that applies ``lm_head`` itself). A token id out of range is a
        ValueError (checked with one min/max reduction, before the embedding, where it would be an opaque index
        error or a CUDA assert)."""
        check_token_ids(tokens, self.config.vocab_size)
        x = self.embed(tokens)
        for block in self.blocks:
            if self.checkpoint_blocks is not None and self.training:
                x = self.checkpoint_blocks(functools.partial(block, cu_seqlens=cu_seqlens, position_ids=position_ids), x)
            else:
                x = block(x, cu_seqlens, position_ids)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, stop_tokens: Iterable[int] = (), **options: Any) -> Generation:
        """Continue the prompts ``tokens [B, T]`` (right-padded; ``lengths=`` gives each prompt's length) by up to
        ``max_new_tokens`` tokens, greedy (``temperature=0``) or sampled (``top_k``, ``generator=``), on one rank;
        see :func:`nsa_dist.inference.generate` for every option and the returned :class:`Generation`."""
        return generate(self, tokens, max_new_tokens, temperature=temperature, top_k=top_k, stop_tokens=stop_tokens,
                        **options)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

