"""``NSASelfAttention``: the self-attention module of a Megatron ``TransformerLayer``, with NSA inside."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..branch_kv import BranchKV
from ..branches import nsa_branches
from ..compression import BlockCompressor
from ..selection_warmup import FullSelectionSwitch
from .batch import cu_seqlens_from_packed_seq_params, megatron_cp_layout
from .config import nsa_config_from_transformer_config
from .rotary import RotaryTable
from .tensor_parallel import KVHeadReplicatedLinear, process_groups, replicate_over_tp


# megatron-core's cp_comm_type values that only choose how dense attention exchanges K/V over the sequence split:
# NSA's own exchange replaces them. "a2a" and "a2a+p2p" split heads over CP ranks (Ulysses), which NSA does not do.
REPLACED_CP_COMM_TYPES = ("p2p", "all_gather")


def check_cp_comm_type(cp_comm_type: Optional[str]) -> None:
    """Megatron's ``cp_comm_type`` for an NSA layer: None passes; ``"p2p"`` (Megatron-LM's default) and
    ``"all_gather"`` pass with a warning, once per process and value, that NSA brings its own context-parallel
    exchange; anything else (``"a2a"``, ``"a2a+p2p"``: heads split over the CP ranks) is a ``ValueError`` naming
    the setting and the value."""
    if cp_comm_type is None:
        return
    if cp_comm_type not in REPLACED_CP_COMM_TYPES:
        raise ValueError(f"cp_comm_type={cp_comm_type!r} cannot be honoured by the NSA layer: its context "
                         f"parallelism splits the sequence and exchanges compressed K/V and selected blocks, it never "
                         f"splits heads over the CP ranks; use cp_comm_type None or one of {REPLACED_CP_COMM_TYPES} "
                         f"(both mean NSA's own exchange)")
    _warn_replaced_cp_comm_type(cp_comm_type)


@functools.lru_cache(maxsize=None)
def _warn_replaced_cp_comm_type(cp_comm_type: str) -> None:
    warnings.warn(f"cp_comm_type={cp_comm_type!r} is ignored by the NSA layer: NSA brings its own context-parallel "
                  f"exchange (all-gather of compressed K/V, fetch of the selected blocks, window halo)", stacklevel=3)


@dataclass
class NSASelfAttentionSubmodules:
    """Projections of :class:`NSASelfAttention` (megatron-core classes or specs).

    linear_qg: column-parallel ``hidden -> HQ * (Dk + 3)``: each query head's query and its three gate logits.
    linear_kv: column-parallel ``hidden -> H * branches * (Dk + Dv)``: each KV head's keys and values for the
        compressed, selected and window branches (one set with ``nsa_kv_sharing="shared"``). Used when the TP
        size divides the KV heads; beyond that the K/V weights are replicated (:class:`KVHeadReplicatedLinear`).
    linear_proj: row-parallel ``HQ * Dv -> hidden``.
    Both column layouts are head-major, so a TP rank's contiguous slice holds whole heads and checkpoints reshard
    across TP sizes.
    """

    linear_qg: Union[ModuleSpec, type] = None
    linear_kv: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None


class NSASelfAttention(FullSelectionSwitch, MegatronModule):
    """Native Sparse Attention as the ``self_attention`` of megatron-core's ``TransformerLayer``.

    ``forward(hidden_states [s, b, h]) -> (output [s, b, h], bias)`` like Megatron's ``SelfAttention`` (``s`` is
    this rank's sequence part: ``/TP`` under sequence parallelism, ``/CP`` under context parallelism).

    - Tensor parallel over heads: each rank runs its ``HQ / TP`` query heads and their KV heads (``H / TP`` of
      them, or the one replicated head when ``TP > H``). The compressors are shared by all heads, replicated on
      the TP ranks with their gradients summed over the group.
    - Context parallel over the config's CP group (``pg_collection.cp``) in the layout of megatron-core's own batch
      split (:func:`~nsa_dist.megatron.config.megatron_layout_kind`): zigzag for unpacked batches
      (``get_batch_on_this_cp_rank``), per document when ``packed_seq_params`` (``thd``) is given
      (``get_thd_batch_on_this_cp_rank``, every document in ``2 * CP`` chunks); split batches with megatron-core's
      functions or :func:`nsa_dist.megatron.split_batch_for_cp_rank`. Compressed tokens and selected blocks are
      exchanged (:mod:`nsa_dist.parallel`).
    - Packed sequences: ``packed_seq_params`` in ``thd`` format gives the global document offsets; no branch
      crosses a document and rotary positions restart at each document.
    - Rotary: the ``rotary_pos_emb`` Megatron passes (RoPE; none with learned absolute positions).
    NSA is causal by construction: ``attention_mask`` must be None and ``attn_mask_type`` causal.
    """

    def __init__(self, config, submodules: NSASelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: Optional[str] = None,
                 pg_collection=None, model_comm_pgs=None, **kwargs):
        """Constructed by ``build_module`` with megatron-core's keywords; ``cp_comm_type`` is checked by
        :func:`check_cp_comm_type` (NSA has its own exchange), version-specific extras (``name``,
        ``pp_layer_offset``, ...) are accepted and unused."""
        super().__init__(config=config)
        check_cp_comm_type(cp_comm_type)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"NSA attention is causal; got attn_mask_type={attn_mask_type}")
        self.layer_number = layer_number
        self.nsa = nsa = nsa_config_from_transformer_config(config)
        self.packed_nsa = nsa_config_from_transformer_config(config, packed=True)  # thd batches' CP layout
        self.tp_group, self.cp_group = process_groups(pg_collection, model_comm_pgs)
        tp = dist.get_world_size(self.tp_group)
        HQ, H, Dk, Dv = nsa.num_heads, nsa.num_kv_heads, nsa.head_dim, nsa.v_head_dim
        if HQ % tp:
            raise ValueError(f"num_attention_heads={HQ} must be divisible by tensor_model_parallel_size={tp}")
        if H % tp and tp % H:
            raise ValueError(f"num_query_groups={H} and tensor_model_parallel_size={tp}: one must divide the other")
        self.local_heads, self.local_kv_heads = HQ // tp, max(H // tp, 1)
        bias = bool(config.add_bias_linear or config.add_qkv_bias)
        column = dict(config=config, init_method=config.init_method, gather_output=False, bias=bias,
                      skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        self.linear_qg = build_module(submodules.linear_qg, config.hidden_size, HQ * (Dk + 3),
                                      tp_comm_buffer_name="qkv", **column)
        kv_width = nsa.num_kv_branches * (Dk + Dv)
        if H % tp == 0:
            self.linear_kv = build_module(submodules.linear_kv, config.hidden_size, H * kv_width,
                                          tp_comm_buffer_name="kv", **column)
        else:
            self.linear_kv = KVHeadReplicatedLinear(config.hidden_size, H, kv_width, config=config,
                                                    init_method=config.init_method, bias=bias,
                                                    tp_group=self.tp_group)
        self.k_compressor = BlockCompressor(nsa.compressor, Dk, nsa.block_len, nsa.stride, nsa.compressor_hidden)
        self.v_compressor = BlockCompressor(nsa.compressor, Dv, nsa.block_len, nsa.stride, nsa.compressor_hidden)
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        for compressor in (self.k_compressor, self.v_compressor):
            compressor.to(device=device, dtype=config.params_dtype)
            replicate_over_tp(compressor.parameters(), self.tp_group)
        self.linear_proj = build_module(submodules.linear_proj, HQ * Dv, config.hidden_size, config=config,
                                        init_method=config.output_layer_init_method, bias=config.add_bias_linear,
                                        input_is_parallel=True, skip_bias_add=True, is_expert=False,
                                        tp_comm_buffer_name="proj", tp_group=self.tp_group)
        self.last_cp_stats = None  # CPStats of the last context-parallel forward
        self.last_selection_loss = None  # selection loss of the last training forward (nsa_selection_loss_weight)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                key_value_states=None, inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None, packed_seq_params=None,
                sequence_len_offset=None, *, inference_params=None, **kwargs):
        """``hidden_states [s, b, h]`` -> ``(output [s, b, h], bias or None)`` (Megatron's attention contract).

        ``rotary_pos_emb``: Megatron's RoPE angles ``[s, 1, 1, R]`` (or a pair of the same tensor);
        ``packed_seq_params``: ``thd`` document offsets (``b = 1``). Inference caches, cross-attention, masks and
        attention biases are not supported and raise ``ValueError``.
        """
        self._check_supported(attention_mask, key_value_states, inference_context or inference_params,
                              attention_bias, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin)
        nsa = self.nsa
        Dk, Dv, nb = nsa.head_dim, nsa.v_head_dim, nsa.num_kv_branches
        qg, _ = self.linear_qg(hidden_states)
        s, b = qg.shape[:2]
        q, gate_logits = qg.view(s, b, self.local_heads, Dk + 3).transpose(0, 1).split([Dk, 3], dim=-1)
        kv, _ = self.linear_kv(hidden_states)
        kv = kv.view(s, b, self.local_kv_heads, nb, Dk + Dv).transpose(0, 1)
        branch = [0, 1, 2] if nb == 3 else [0, 0, 0]
        (k_c, k_s, k_w), (v_c, v_s, v_w) = ([t[:, :, :, i].contiguous() for i in branch]
                                            for t in kv.split([Dk, Dv], dim=-1))
        cu_seqlens = cu_seqlens_from_packed_seq_params(packed_seq_params)
        cp_group = self.cp_group if dist.get_world_size(self.cp_group) > 1 else None
        rotary = None
        if rotary_pos_emb is not None:
            rope = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            rotary = RotaryTable(rope, self._rope_row_positions(rope, s, cu_seqlens, cp_group), Dk,
                                 interleaved=getattr(self.config, "rotary_interleaved", False))
        layer_nsa = nsa if cu_seqlens is None else self.packed_nsa  # megatron-core's CP split of this batch
        o, self.last_cp_stats, self.last_selection_loss = nsa_branches(
            layer_nsa, q.contiguous(), BranchKV(k_c, v_c, k_s, v_s, k_w, v_w), torch.sigmoid(gate_logits).contiguous(),
            k_compressor=self.k_compressor, v_compressor=self.v_compressor, rotary=rotary, cu_seqlens=cu_seqlens,
            cp_group=cp_group, full_selection=self.full_selection)
        return self.linear_proj(o.transpose(0, 1).reshape(s, b, self.local_heads * Dv))

    def _rope_row_positions(self, rope: torch.Tensor, s: int, cu_seqlens, cp_group) -> torch.Tensor:
        """The position each row of Megatron's RoPE table stands for: ``0 .. S-1`` for packed ``thd`` (the table
        is indexed by position in the document) or without CP; the local zigzag tokens' positions under CP."""
        if cu_seqlens is not None or cp_group is None:
            return torch.arange(rope.shape[0])
        P = dist.get_world_size(cp_group)
        return megatron_cp_layout(P, s * P, self.nsa.select_len).positions(dist.get_rank(cp_group))

    @staticmethod
    def _check_supported(attention_mask, key_value_states, inference, attention_bias, rotary_pos_emb,
                         rotary_pos_cos, rotary_pos_sin) -> None:
        if attention_mask is not None:
            raise ValueError("NSA is causal by construction and takes document boundaries from packed_seq_params "
                             "(thd); pass attention_mask=None (GPTDatasetConfig(create_attention_mask=False))")
        if key_value_states is not None:
            raise ValueError("NSASelfAttention is self-attention: key_value_states must be None")
        if inference is not None:
            raise ValueError("NSASelfAttention has no inference KV cache: inference_context must be None")
        if attention_bias is not None:
            raise ValueError("NSA takes no attention_bias")
        if isinstance(rotary_pos_emb, tuple) and rotary_pos_emb[0] is not rotary_pos_emb[1]:
            raise ValueError("NSA self-attention needs the same rotary_pos_emb for queries and keys")
        if rotary_pos_emb is None and (rotary_pos_cos is not None or rotary_pos_sin is not None):
            raise ValueError("NSA takes RoPE as rotary_pos_emb angles, not precomputed cos/sin (inference path)")
