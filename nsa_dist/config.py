"""``NSAConfig``: every NSA hyper-parameter, with the paper's defaults, validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

from nsa_kernels import NSAGeometry
from nsa_kernels.validation import check_non_negative_int, check_positive_int, check_selection_geometry

from .parallel.layout import check_layout_kind
from .parallel.selected_exchange import check_selection_exchange
from .recipes import apply_recipe
from .validation import check_bool, check_real

COMPRESSORS = ("mlp", "linear", "mean", "softmax")
KV_SHARING = ("separate", "shared")
SELECTION_SCORINGS = ("compressed", "key_bound", "max_logit")
BRANCHES = ("compressed", "selected", "window")
DISABLEABLE_BRANCHES = ("compressed", "selected")


@dataclass(frozen=True)
class NSAConfig:
    """Configuration of one :class:`~nsa_dist.attention.NativeSparseAttention` layer.

    Attributes:
        hidden_size: model width (input and output of the layer).
        num_heads: query heads ``HQ``; num_kv_heads: KV heads ``H`` (``HQ % H == 0``, group ``G = HQ / H``).
        head_dim: query/key head dim ``Dk``; v_head_dim: value head dim ``Dv`` (default ``Dk``).
        block_len, stride: compression block length ``l`` and stride ``d`` (``l % d == 0``; paper 32, 16).
        select_len, top_n: selection block length ``l'`` (``l' % d == 0``; paper 64) and blocks per query (16).
        window: sliding-window size ``w`` (512); 0 drops the window branch.
        init_blocks, local_blocks: always-selected leading blocks (1) and most recent blocks (2).
        compressor: ``"mlp"`` (paper; mean pooling plus a zero-initialised MLP over the block with intra-block
            position embeddings), ``"linear"`` (one linear map, initialised to mean pooling), ``"mean"``
            (parameter-free mean pooling, as flash-linear-attention) or ``"softmax"`` (per-coordinate softmax
            pooling with a learned sharpness starting at mean pooling and able to reach max pooling, so a single
            token's signal survives compression; see :class:`~nsa_dist.BlockCompressor`).
        compressor_hidden: MLP width of the ``"mlp"`` compressor (default ``4 * Dk``).
        kv_sharing: ``"separate"`` K/V projections per branch (paper) or ``"shared"`` by all three.
        rope_theta: rotary base; ``use_rope=False`` disables rotary embeddings.
        softmax_scale: attention scale (default ``1 / sqrt(Dk)``).
        qkv_bias: biases on the q/k/v projections.
        cp_layout: sequence layout under context parallelism (:class:`~nsa_dist.parallel.CPLayout`), used only when
            the layer gets a ``cp_group``: ``"zigzag"`` (megatron-core's split of unpacked batches, ``2P`` chunks),
            ``"contiguous"`` (``P`` chunks) or ``"per_document"`` (megatron-core's split of packed ``thd`` batches:
            every document of the call's ``cu_seqlens``, its length divisible by ``2P``, in ``2P`` chunks; calls
            without ``cu_seqlens`` are a ValueError).
        cp_selection_exchange: how selected blocks reach their queries under context parallelism: ``"auto"``
            (the cheaper in bytes), ``"sparse"`` (fetch only the selected blocks) or ``"allgather"`` (all raw
            selection K/V).
        disabled_branches: ablations: ``"compressed"`` and/or ``"selected"`` branches whose gate is held at 0,
            so they add nothing to the output (``window: 0`` drops the window branch). Both are still computed:
            selection needs the compressed attention scores; without the compressed branch's output its keys
            get no gradient, so blocks are then chosen by untrained compressed keys.
        selection_loss_weight: weight of the selection (indexer) loss of :mod:`nsa_dist.selection_loss`, a KL from
            full attention's mass per selection block (over the selection keys, detached) to the block scores that
            top-n ranks; 0 (default) turns it off and the paper's semantics hold exactly. Single rank only (not
            under context parallelism).
        selection_loss_rows: query rows per sequence the selection loss samples (its cost is
            ``O(rows * T * HQ * Dk)`` per layer).
        selection_scoring: what ranks the selection blocks: ``"compressed"`` (paper: the compressed-attention
            probabilities) or ``"key_bound"`` (an upper bound of the selected branch's own logits from per-tile
            key minima and maxima, :mod:`nsa_dist.key_bound_selection`; nothing to learn, so the selection
            follows the selected branch's queries and keys; under context parallelism the ranks all-reduce the
            tile bounds) or ``"max_logit"`` (each block's exact largest logit of the selected branch,
            :mod:`nsa_dist.max_logit_selection`, the maximum the key bound bounds; under context parallelism
            the ranks all-gather the raw selection keys).
        selection_warmup_steps: training steps, from the first, during which the selected branch attends every
            block (causal attention over the selection K/V; :mod:`nsa_dist.selection_warmup`), so the model
            learns with full attention while the selection loss trains the block scores; then the paper's top-n.
            0 (default): top-n from the start. Read by the trainers; evaluation always uses top-n. Under context
            parallelism the warm-up's selected branch all-gathers the raw selection K/V (as dense attention).
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: Optional[int] = None
    block_len: int = 32
    stride: int = 16
    select_len: int = 64
    top_n: int = 16
    window: int = 512
    init_blocks: int = 1
    local_blocks: int = 2
    compressor: str = "mlp"
    compressor_hidden: Optional[int] = None
    kv_sharing: str = "separate"
    use_rope: bool = True
    rope_theta: float = 10000.0
    softmax_scale: Optional[float] = None
    qkv_bias: bool = False
    cp_layout: str = "zigzag"
    cp_selection_exchange: str = "auto"
    disabled_branches: Tuple[str, ...] = ()
    selection_loss_weight: float = 0.0
    selection_loss_rows: int = 256
    selection_scoring: str = "compressed"
    selection_warmup_steps: int = 0

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            check_positive_int(name, getattr(self, name))
        check_non_negative_int("window", self.window)
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        check_positive_int("v_head_dim", self.v_head_dim)
        if self.compressor_hidden is None:
            object.__setattr__(self, "compressor_hidden", 4 * self.head_dim)
        check_positive_int("compressor_hidden", self.compressor_hidden)
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        check_selection_geometry(self.block_len, self.stride, self.select_len, self.top_n, self.init_blocks,
                                 self.local_blocks)
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor={self.compressor!r} is not one of {COMPRESSORS}")
        if self.kv_sharing not in KV_SHARING:
            raise ValueError(f"kv_sharing={self.kv_sharing!r} is not one of {KV_SHARING}")
        if self.use_rope and self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings (or set use_rope=False)")
        check_real("rope_theta", self.rope_theta, 0, low_open=True)
        check_real("softmax_scale", self.softmax_scale, 0, low_open=True, optional=True)
        for name in ("use_rope", "qkv_bias"):
            check_bool(name, getattr(self, name))
        check_layout_kind(self.cp_layout, "cp_layout")
        self._check_disabled_branches()
        check_selection_exchange(self.cp_selection_exchange, "cp_selection_exchange")
        check_real("selection_loss_weight", self.selection_loss_weight, 0)
        check_positive_int("selection_loss_rows", self.selection_loss_rows)
        check_non_negative_int("selection_warmup_steps", self.selection_warmup_steps)
        if self.selection_scoring not in SELECTION_SCORINGS:
            raise ValueError(f"selection_scoring={self.selection_scoring!r} is not one of {SELECTION_SCORINGS}")
        if self.selection_scoring != "compressed" and self.selection_loss_weight:
            raise ValueError(f"selection_loss_weight={self.selection_loss_weight} trains the compressed scores, "
                             f"which do not rank blocks under selection_scoring={self.selection_scoring!r}; set it "
                             "to 0")

    def _check_disabled_branches(self) -> None:
        if isinstance(self.disabled_branches, str):
            raise ValueError(f"disabled_branches must be a list of branch names, got the string "
                             f"{self.disabled_branches!r}")
        object.__setattr__(self, "disabled_branches", tuple(self.disabled_branches))
        for name in self.disabled_branches:
            if name == "window":
                raise ValueError("disabled_branches: drop the window branch with window=0, not 'window'")
            if name not in DISABLEABLE_BRANCHES:
                raise ValueError(f"disabled_branches entry {name!r} is not one of {DISABLEABLE_BRANCHES}")
        if len(set(self.disabled_branches)) == 2 and self.window == 0:
            raise ValueError("disabled_branches=('compressed', 'selected') with window=0 leaves no branch")

    @property
    def branch_gate_mask(self) -> Optional[Tuple[float, float, float]]:
        """Per-branch gate multipliers ``(compressed, selected, window)``: 0 for a disabled branch; None when
        every branch is on."""
        if not self.disabled_branches:
            return None
        return tuple(0.0 if b in self.disabled_branches else 1.0 for b in BRANCHES)

    def geometry(self) -> NSAGeometry:
        """The NSA geometry of this layer (``block_len`` ... ``local_blocks``, ``window``) as the one value the
        context-parallel op and the selection loss take; the softmax scale (``softmax_scale``) travels beside it."""
        return NSAGeometry(self.block_len, self.stride, self.select_len, self.top_n, self.window, self.init_blocks,
                           self.local_blocks)

    @property
    def group_size(self) -> int:
        """GQA group ``G = num_heads / num_kv_heads``."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_kv_branches(self) -> int:
        """Number of distinct K/V projections: 3 (compressed, selected, window) or 1 when shared."""
        return 3 if self.kv_sharing == "separate" else 1

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], where: str = "nsa") -> "NSAConfig":
        """Build from a mapping (e.g. YAML): its ``recipe`` key, if any, expanded by
        :func:`~nsa_dist.recipes.apply_recipe` (errors name ``where``); unknown keys are an error naming them."""
        values = apply_recipe(values, where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown NSAConfig keys {unknown}; valid keys are {sorted(known | {'recipe'})}")
        return cls(**values)
