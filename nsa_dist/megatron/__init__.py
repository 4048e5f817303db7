"""Megatron-core integration: an NSA ``TransformerLayer`` spec, tensor / sequence / context parallel.

Needs megatron-core 0.15 to 0.19 (``pip install 'nsa-dist[megatron]'``)::

    from nsa_dist.megatron import NSATransformerConfig, get_gpt_layer_nsa_spec
    config = NSATransformerConfig(num_layers=..., hidden_size=..., num_attention_heads=..., nsa_window=512)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_nsa_spec(), ...)

Megatron-LM: ``--spec nsa_dist.megatron nsa_layer_spec`` with ``extra_args_provider=add_nsa_arguments``.
"""
from .requirements import require_megatron

require_megatron()

from .arguments import add_nsa_arguments, nsa_fields_from_args  # noqa: E402
from .attention import NSASelfAttention, NSASelfAttentionSubmodules  # noqa: E402
from .batch import cu_seqlens_from_packed_seq_params, megatron_cp_layout, split_batch_for_cp_rank  # noqa: E402
from .config import (NSATransformerConfig, megatron_layout_kind, megatron_lm_args,  # noqa: E402
                     nsa_config_from_transformer_config)
from .norm import SequenceParallelTorchNorm  # noqa: E402
from .spec import (default_backend, get_gpt_decoder_block_nsa_spec, get_gpt_layer_nsa_spec,  # noqa: E402
                   get_nsa_attention_spec, nsa_layer_spec)

__all__ = [
    "NSATransformerConfig", "nsa_config_from_transformer_config", "megatron_lm_args", "NSASelfAttention",
    "NSASelfAttentionSubmodules", "get_gpt_layer_nsa_spec", "get_gpt_decoder_block_nsa_spec", "get_nsa_attention_spec",
    "default_backend", "nsa_layer_spec", "add_nsa_arguments", "nsa_fields_from_args", "SequenceParallelTorchNorm",
    "split_batch_for_cp_rank", "megatron_cp_layout", "megatron_layout_kind", "cu_seqlens_from_packed_seq_params",
]
