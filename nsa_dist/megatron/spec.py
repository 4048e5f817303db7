"""``get_gpt_layer_nsa_spec``: megatron-core's local GPT layer spec with NSA as its self-attention."""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from .attention import NSASelfAttention, NSASelfAttentionSubmodules
from .norm import SequenceParallelTorchNorm


def get_nsa_attention_spec() -> ModuleSpec:
    """The ``self_attention`` spec: :class:`NSASelfAttention` with column-parallel q/gate and K/V projections
    and a row-parallel output projection (megatron-core's own linears, no Transformer Engine needed)."""
    return ModuleSpec(module=NSASelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=NSASelfAttentionSubmodules(linear_qg=ColumnParallelLinear,
                                                            linear_kv=ColumnParallelLinear,
                                                            linear_proj=RowParallelLinear))


def get_gpt_layer_nsa_spec(num_experts: Optional[int] = None, moe_grouped_gemm: bool = False,
                           normalization: Optional[str] = None) -> ModuleSpec:
    """A ``ModuleSpec`` for ``TransformerLayer`` (pass it to ``GPTModel(transformer_layer_spec=...)``):
    megatron-core's ``get_gpt_layer_local_spec`` (norms, MLP or MoE, bias-dropout-add) with NSA self-attention.
    Where that spec would use torch norms (no apex), they become :class:`SequenceParallelTorchNorm` so that
    sequence parallelism works; GPTModel's final norm is chosen by megatron-core itself, so with sequence
    parallelism and neither Transformer Engine nor apex use :func:`get_gpt_decoder_block_nsa_spec`.

    Args:
        num_experts, moe_grouped_gemm: MoE MLP as in ``get_gpt_layer_local_spec``.
        normalization: ``"RMSNorm"`` or None (LayerNorm).
    The NSA hyper-parameters live on the config (:class:`nsa_dist.megatron.NSATransformerConfig`).
    """
    local = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                     normalization=normalization)
    keys_map = {k: v for k, v in (local.submodules.sharded_state_dict_keys_map or {}).items()
                if not v.startswith("self_attention.")}  # the map names fused TE norms of Megatron's attention
    norms = {name: SequenceParallelTorchNorm for name in ("input_layernorm", "pre_mlp_layernorm")
             if getattr(local.submodules, name) is WrappedTorchNorm}
    submodules = dataclasses.replace(local.submodules, self_attention=get_nsa_attention_spec(),
                                     sharded_state_dict_keys_map=keys_map, **norms)
    return dataclasses.replace(local, submodules=submodules)


def get_gpt_decoder_block_nsa_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None,
                                   **layer_kwargs) -> TransformerBlockSubmodules:
    """The whole decoder block (pass it as ``GPTModel(transformer_layer_spec=...)``): this pipeline stage's layers
    from :func:`get_gpt_layer_nsa_spec` (``layer_kwargs``) and a final norm that supports sequence parallelism."""
    layer = get_gpt_layer_nsa_spec(**layer_kwargs)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelTorchNorm)
