"""``NSAGPTConfig``: a transformers config holding the fields of :class:`~nsa_dist.GPTConfig`."""
from __future__ import annotations

from dataclasses import MISSING, fields

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ..models.gpt import GPTConfig

GPT_FIELDS = tuple(f.name for f in fields(GPTConfig))
GPT_DEFAULTS = {f.name: f.default for f in fields(GPTConfig) if f.default is not MISSING}


@strict
class NSAGPTConfig(PreTrainedConfig):
    """The shape of an :class:`~nsa_dist.GPT` (``model_type: nsa_gpt``): the fields of :class:`~nsa_dist.GPTConfig`
    under their names there (``nsa`` the NSA overrides, e.g. ``{"block_len": 32, "kv_sharing": "shared"}``), checked
    by building a ``GPTConfig``; ``head_dim`` and ``ffn_hidden_size`` are stored resolved. transformers' standard
    names (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``tie_word_embeddings``,
    ``initializer_range``, ``rms_norm_eps``) read and write the same fields. ``vocab_size`` defaults to 256 (bytes)."""

    model_type = "nsa_gpt"
    attribute_map = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "num_key_value_heads": "num_kv_heads", "tie_word_embeddings": "tie_embeddings",
                     "initializer_range": "init_std", "rms_norm_eps": "norm_eps"}

    vocab_size: int = 256
    hidden_size: int = GPT_DEFAULTS["hidden_size"]
    num_layers: int = GPT_DEFAULTS["num_layers"]
    num_heads: int = GPT_DEFAULTS["num_heads"]
    num_kv_heads: int = GPT_DEFAULTS["num_kv_heads"]
    head_dim: int | None = None
    ffn_hidden_size: int | None = None
    attention: str = GPT_DEFAULTS["attention"]
    nsa: dict | None = None
    tie_embeddings: bool = GPT_DEFAULTS["tie_embeddings"]
    rope_theta: float = GPT_DEFAULTS["rope_theta"]
    norm_eps: float = GPT_DEFAULTS["norm_eps"]
    init_std: float = GPT_DEFAULTS["init_std"]
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.nsa = dict(self.nsa or {})
        resolved = self.gpt_config()  # the GPTConfig checks, with errors naming the fields
        self.head_dim, self.ffn_hidden_size = resolved.head_dim, resolved.ffn_hidden_size
        super().__post_init__(**kwargs)

    def gpt_config(self) -> GPTConfig:
        """The :class:`~nsa_dist.GPTConfig` these fields describe."""
        return GPTConfig.from_dict({name: getattr(self, name) for name in GPT_FIELDS})

    @classmethod
    def from_gpt_config(cls, config: GPTConfig, **kwargs) -> "NSAGPTConfig":
        """The config of ``config`` (``kwargs``: further transformers settings, e.g. ``eos_token_id``)."""
        return cls(**config.to_dict(), **kwargs)
