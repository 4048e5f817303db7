"""Megatron-core integration: an NSA ``TransformerLayer`` spec, tensor / sequence / context parallel.

Needs megatron-core 0.15 to 0.19 (``pip install 'nsa-dist[megatron]'``)::

    from nsa_dist.megatron import NSATransformerConfig, get_gpt_layer_nsa_spec
    config = NSATransformerConfig(num_layers=..., hidden_size=..., num_attention_heads=..., nsa_window=512)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_nsa_spec(), ...)
"""
from .requirements import require_megatron

require_megatron()

from .attention import NSASelfAttention, NSASelfAttentionSubmodules  # noqa: E402
from .batch import cu_seqlens_from_packed_seq_params, get_batch_on_this_cp_rank  # noqa: E402
from .config import NSATransformerConfig, nsa_config_from_transformer_config  # noqa: E402
from .norm import SequenceParallelTorchNorm  # noqa: E402
from .spec import get_gpt_decoder_block_nsa_spec, get_gpt_layer_nsa_spec  # noqa: E402

__all__ = [
    "NSATransformerConfig", "nsa_config_from_transformer_config", "NSASelfAttention", "NSASelfAttentionSubmodules",
    "get_gpt_layer_nsa_spec", "get_gpt_decoder_block_nsa_spec", "SequenceParallelTorchNorm", "get_batch_on_this_cp_rank", "cu_seqlens_from_packed_seq_params",
]
