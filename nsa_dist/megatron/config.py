"""NSA hyper-parameters on a Megatron ``TransformerConfig``."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import NSAConfig
from ..recipes import RECIPES, check_recipe

# NSAConfig field <- TransformerConfig field; all optional on the config (the paper's values otherwise)
NSA_FIELDS = {
    "block_len": "nsa_block_len", "stride": "nsa_stride", "select_len": "nsa_select_len", "top_n": "nsa_top_n",
    "window": "nsa_window", "init_blocks": "nsa_init_blocks", "local_blocks": "nsa_local_blocks",
    "compressor": "nsa_compressor", "compressor_hidden": "nsa_compressor_hidden",
    "kv_sharing": "nsa_kv_sharing", "cp_selection_exchange": "nsa_cp_selection_exchange",
    "v_head_dim": "nsa_v_head_dim", "selection_loss_weight": "nsa_selection_loss_weight",
    "selection_loss_rows": "nsa_selection_loss_rows", "selection_warmup_steps": "nsa_selection_warmup_steps",
    "selection_scoring": "nsa_selection_scoring",
}


def _default(name: str):
    """:class:`NSAConfig`'s default of ``name`` (one source for both configs)."""
    return NSAConfig.__dataclass_fields__[name].default


@dataclass
class NSATransformerConfig(TransformerConfig):
    """megatron-core's ``TransformerConfig`` plus the NSA hyper-parameters (see :class:`nsa_dist.NSAConfig`).

    Heads, head dim (``kv_channels``), KV groups (``num_query_groups``), ``softmax_scale`` and ``add_qkv_bias``
    come from the Megatron fields. A plain ``TransformerConfig`` works too (Megatron-LM builds one): a missing
    ``nsa_*`` field takes Megatron-LM's ``--nsa-*`` argument (:func:`megatron_lm_args`), else the paper's value
    (l 32, d 16, l' 64, n 16, w 512). Under context parallelism the sequence layout is megatron-core's own split
    (:func:`megatron_layout_kind`): zigzag (``2 * CP`` chunks) for unpacked batches, so ``seq_length`` must be a
    multiple of ``2 * CP * nsa_select_len``; per document for packed ``thd`` batches, so every (padded) document
    length must be a multiple of ``2 * CP``.

    ``nsa_recipe`` is the one switch of :mod:`nsa_dist.recipes` (``"retrieval"``: key-bound scoring and shared K/V;
    give ``nsa_selection_warmup_steps`` too, and switch the warm-up in the training loop with
    :func:`~nsa_dist.selection_warmup.set_full_selection`). A recipe sets the fields it names that are left at
    the paper's values; a field set to another value than the recipe's is an error naming both.
    """

    nsa_block_len: int = _default("block_len")
    nsa_stride: int = _default("stride")
    nsa_select_len: int = _default("select_len")
    nsa_top_n: int = _default("top_n")
    nsa_window: int = _default("window")
    nsa_init_blocks: int = _default("init_blocks")
    nsa_local_blocks: int = _default("local_blocks")
    nsa_compressor: str = _default("compressor")
    nsa_compressor_hidden: Optional[int] = _default("compressor_hidden")
    nsa_kv_sharing: str = _default("kv_sharing")
    nsa_cp_selection_exchange: str = _default("cp_selection_exchange")
    nsa_v_head_dim: Optional[int] = _default("v_head_dim")
    nsa_selection_loss_weight: float = _default("selection_loss_weight")
    nsa_selection_loss_rows: int = _default("selection_loss_rows")
    nsa_selection_warmup_steps: int = _default("selection_warmup_steps")
    nsa_selection_scoring: str = _default("selection_scoring")
    nsa_recipe: str = "paper"

    def __post_init__(self):
        super().__post_init__()
        nsa_config_from_transformer_config(self)  # validates the NSA fields, errors name them


def megatron_lm_args():
    """The arguments Megatron-LM's training parsed (what ``megatron.training.get_args()`` returns), or None outside
    a Megatron-LM run (``megatron.training`` not imported, or nothing parsed yet). Never imports Megatron-LM."""
    return getattr(sys.modules.get("megatron.training.global_vars"), "_GLOBAL_ARGS", None)


def megatron_layout_kind(packed: bool) -> str:
    """The context-parallel layout megatron-core's own batch split produces, which the NSA layer therefore uses:
    ``"zigzag"`` for unpacked batches (``get_batch_on_this_cp_rank``), ``"per_document"`` for packed ``thd``
    batches (``get_thd_batch_on_this_cp_rank``, Transformer Engine's ``thd_get_partitioned_indices``: every
    document in ``2 * CP`` chunks). See :class:`~nsa_dist.parallel.CPLayout`."""
    return "per_document" if packed else "zigzag"


def nsa_config_from_transformer_config(config: TransformerConfig, packed: bool = False) -> NSAConfig:
    """The :class:`NSAConfig` of a Megatron config (global head counts; rotary comes from Megatron, so
    ``use_rope=False``; ``cp_layout`` megatron-core's split, :func:`megatron_layout_kind`: zigzag, or per_document
    for ``packed`` ``thd`` batches; ``nsa_recipe`` applied to the fields left at the paper's values). Each
    ``nsa_*`` setting is the config's attribute, else the same-named argument Megatron-LM parsed
    (``--nsa-*``, :func:`megatron_lm_args`), else the paper's value. Errors name the offending ``nsa_*`` field."""
    heads = config.num_attention_heads
    args = megatron_lm_args()

    def setting(name: str, default=None):
        return getattr(config, name, getattr(args, name, default))

    recipe = check_recipe(setting("nsa_recipe", "paper"), "config.nsa_recipe")
    values = {f: v for f, m in NSA_FIELDS.items() if (v := setting(m)) is not None
              and not (f in RECIPES[recipe] and v == _default(f))}  # left at the paper's value: the recipe's
    try:
        return NSAConfig.from_dict(dict(
            hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=config.num_query_groups or heads,
            head_dim=config.kv_channels or config.hidden_size // heads, use_rope=False,
            softmax_scale=config.softmax_scale, qkv_bias=bool(config.add_qkv_bias),
            cp_layout=megatron_layout_kind(packed),
            recipe=recipe, **values), where="config")
    except ValueError as err:
        names = ", ".join([f"{f} = config.{m}" for f, m in NSA_FIELDS.items()] + ["recipe = config.nsa_recipe"])
        raise ValueError(f"invalid NSA settings on the Megatron config or Megatron-LM's --nsa-* arguments ({names}): "
                         f"{err}") from err
