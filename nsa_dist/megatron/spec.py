"""NSA layer specs for megatron-core, built from its backend providers (local modules, or Transformer Engine's).

``nsa_layer_spec`` is a module-level ``ModuleSpec`` for Megatron-LM's ``--spec nsa_dist.megatron nsa_layer_spec``
(``import_module`` returns the attribute itself); :func:`get_gpt_layer_nsa_spec` builds one with options.
"""
from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import NSASelfAttention, NSASelfAttentionSubmodules
from .norm import SequenceParallelTorchNorm


def default_backend() -> BackendSpecProvider:
    """megatron-core's ``TESpecProvider`` when Transformer Engine is importable, else its ``LocalSpecProvider``
    (megatron-core's own linears and norms), the choice megatron-core's GPT specs make."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    except ImportError:
        return LocalSpecProvider()
    return TESpecProvider()


def get_nsa_attention_spec(backend: Optional[BackendSpecProvider] = None) -> ModuleSpec:
    """The ``self_attention`` spec: :class:`NSASelfAttention` with the backend's column-parallel q/gate and K/V
    projections and its row-parallel output projection (default backend: :func:`default_backend`). The
    projections are never fused with the input norm: two of them read the normalised input."""
    backend = backend if backend is not None else default_backend()
    column = backend.column_parallel_linear()
    return ModuleSpec(module=NSASelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                      submodules=NSASelfAttentionSubmodules(linear_qg=column, linear_kv=column,
                                                            linear_proj=backend.row_parallel_linear()))


def _layer_norm(backend: BackendSpecProvider, normalization: Optional[str]) -> type:
    """The backend's norm; megatron-core's torch norm (which refuses sequence parallelism) becomes
    :class:`SequenceParallelTorchNorm`."""
    norm = backend.layer_norm(rms_norm=normalization == "RMSNorm", for_qk=False)
    return SequenceParallelTorchNorm if norm is WrappedTorchNorm else norm


def get_gpt_layer_nsa_spec(num_experts: Optional[int] = None, moe_grouped_gemm: bool = False,
                           normalization: Optional[str] = None,
                           backend: Optional[BackendSpecProvider] = None) -> ModuleSpec:
    """A ``ModuleSpec`` for ``TransformerLayer`` (pass it to ``GPTModel(transformer_layer_spec=...)``) with NSA
    self-attention, built like megatron-core's GPT layer specs from a backend provider: its norms, its MLP or MoE
    (``get_mlp_module_spec_for_backend``) and bias-dropout-add. Where the backend gives megatron-core's torch norm
    (no Transformer Engine, no apex) it becomes :class:`SequenceParallelTorchNorm` so that sequence parallelism
    works; GPTModel's final norm is chosen by megatron-core itself, so with sequence parallelism and neither
    Transformer Engine nor apex use :func:`get_gpt_decoder_block_nsa_spec`.

    Args:
        num_experts, moe_grouped_gemm: MoE MLP as in megatron-core's GPT layer specs.
        normalization: ``"RMSNorm"`` or None (LayerNorm) for backends whose norm class depends on it (the local
            one with apex); Transformer Engine's and the torch norms follow ``config.normalization``.
        backend: a megatron-core ``BackendSpecProvider``; default :func:`default_backend`.
    The NSA hyper-parameters live on the config (:class:`nsa_dist.megatron.NSATransformerConfig`) or come from
    Megatron-LM's ``--nsa-*`` arguments (:func:`nsa_dist.megatron.add_nsa_arguments`).
    """
    backend = backend if backend is not None else default_backend()
    norm = _layer_norm(backend, normalization)
    fused = backend.fuse_layernorm_and_linear()  # the MLP's first linear then holds the pre-MLP norm
    mlp = get_mlp_module_spec_for_backend(backend=backend, num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm)
    # unfused, the pre-MLP norm is saved under the fused module's name, so checkpoints move between backends
    keys_map = {} if fused else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=get_nsa_attention_spec(backend), self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=IdentityOp if fused and num_experts is None else norm, mlp=mlp,
        mlp_bda=get_bias_dropout_add, sharded_state_dict_keys_map=keys_map))


def get_gpt_decoder_block_nsa_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None,
                                   **layer_kwargs) -> TransformerBlockSubmodules:
    """The whole decoder block (pass it as ``GPTModel(transformer_layer_spec=...)``): this pipeline stage's layers
    from :func:`get_gpt_layer_nsa_spec` (``layer_kwargs``) and a final norm of the same backend that supports
    sequence parallelism."""
    layer = get_gpt_layer_nsa_spec(**layer_kwargs)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=layer.submodules.input_layernorm)


# Megatron-LM: --spec nsa_dist.megatron nsa_layer_spec (the default backend, norms following config.normalization)
nsa_layer_spec = get_gpt_layer_nsa_spec()
