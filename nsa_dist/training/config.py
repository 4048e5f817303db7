"""The training job's configuration: a YAML file with ``model``, ``data`` and ``train`` sections."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from nsa_kernels.validation import check_non_negative_int, check_positive_int

from ..data import RetrievalTask
from ..models import GPTConfig
from ..parallel.sharding import CPLayout
from ..parallel.ulysses import ulysses_local_heads
from ..recipes import with_recipe_warmup
from ..validation import check_bool, check_mapping, check_optional_positive_int, check_real
from ..yaml_loader import load_yaml_mapping

DATA_KINDS = ("retrieval", "text")
PRECISIONS = ("fp32", "bf16")


def _from_section(cls, values: Optional[Dict[str, Any]], section: str):
    """``cls(**values)`` for config section ``section`` (None: all defaults); the section must be a mapping
    whose keys are ``cls``'s fields (ValueError naming the section otherwise)."""
    if values is None:
        values = {}
    check_mapping(f"section {section!r}", values)
    values = dict(values)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in section {section!r}; valid keys are {sorted(known)}")
    return cls(**values)


@dataclass
class DataConfig:
    """``kind: retrieval`` (synthetic task, see :class:`RetrievalTask`) or ``kind: text`` with ``text_file``.

    ``valid_fraction`` (text only): the file's last fraction of bytes is held out; evaluation batches come from it
    and training windows from the rest (0: both from the whole file).
    ``short_seq_len``, ``short_steps``: a one-stage sequence-length curriculum (as DeepSpeed's seqlen curriculum):
    the first ``short_steps`` steps train on ``short_seq_len``-token sequences, ``seq_len / short_seq_len`` times
    as many per step (the same tokens per step); evaluation is always at ``seq_len``. Plain backend only."""
    kind: str = "retrieval"
    seq_len: int = 512
    text_file: Optional[str] = None
    retrieval: Dict[str, Any] = field(default_factory=dict)
    valid_fraction: float = 0.0
    short_seq_len: Optional[int] = None
    short_steps: int = 0

    def __post_init__(self):
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind={self.kind!r} is not one of {DATA_KINDS}")
        if self.kind == "text" and not self.text_file:
            raise ValueError("data.kind='text' needs data.text_file (a path to a plain text file)")
        check_real("data.valid_fraction", self.valid_fraction, 0, 0.5, high_open=True)
        if self.valid_fraction and self.kind != "text":
            raise ValueError(f"data.valid_fraction={self.valid_fraction} applies to kind='text' only (the retrieval "
                             "task draws fresh sequences for evaluation)")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"data.seq_len must be an int >= 2, got {self.seq_len!r}")
        self._check_short_phase()
        if self.kind == "retrieval":
            task = _from_section(RetrievalTask, self.retrieval, "data.retrieval")
            for name in ("seq_len", "short_seq_len"):
                length = getattr(self, name)
                if length is not None and length < task.min_seq_len():
                    raise ValueError(f"data.{name}={length} is too short for {task.num_pairs} retrieval pairs "
                                     f"(need >= {task.min_seq_len()})")

    def _check_short_phase(self) -> None:
        check_non_negative_int("data.short_steps", self.short_steps)
        if self.short_seq_len is None:
            if self.short_steps:
                raise ValueError(f"data.short_steps={self.short_steps} needs data.short_seq_len")
            return
        if isinstance(self.short_seq_len, bool) or not isinstance(self.short_seq_len, int) or not (
                2 <= self.short_seq_len < self.seq_len) or self.seq_len % self.short_seq_len:
            raise ValueError(f"data.short_seq_len must be an int >= 2 that divides data.seq_len={self.seq_len} and is "
                             f"shorter, got {self.short_seq_len!r}")
        if not self.short_steps:
            raise ValueError(f"data.short_seq_len={self.short_seq_len} needs data.short_steps >= 1")


@dataclass
class OptimConfig:
    """Optimisation and logging: AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``.

    ``batch_size``: sequences per optimizer step over all data-parallel ranks (DeepSpeed's ``train_batch_size``),
    split into ``grad_accum`` micro-steps.
    ``cp``: context-parallel ranks, each holding ``T / cp`` tokens of every sequence (NSA exchanges compressed
    tokens and selected blocks; dense attention all-gathers K/V). Without DeepSpeed they run as local gloo
    processes on the CPU (``threads`` are shared among them); under the DeepSpeed backend the launcher's ranks form
    context-parallel groups (``U`` apart, see ``ulysses``) and data parallelism spans the rest.
    ``ulysses``: Ulysses ranks inside each context-parallel shard (:mod:`nsa_dist.parallel.ulysses`): the ``U``
    ranks split the shard into contiguous pieces and the NSA layers trade them for heads with an all-to-all, so each
    rank computes ``num_heads / U`` query heads of the whole shard. ``cp * ulysses`` ranks share every sequence
    (local gloo processes in the plain backend; under DeepSpeed the ``DP x CP x U`` grid of
    :class:`nsa_dist.deepspeed.ContextDataParallelGroups`, Ulysses innermost, and DeepSpeed's
    ``sequence_parallel_size`` is ``cp * ulysses``). NSA attention only; ``ulysses`` must divide ``num_heads``, and
    divide ``num_kv_heads`` or be a multiple of it (then each GQA group is replicated on ``ulysses /
    num_kv_heads`` ranks and computed on each).
    ``deepspeed_config``: a DeepSpeed JSON (e.g. ``configs/deepspeed/zero3.json``) selects the DeepSpeed backend
    (launch with ``deepspeed``; see :mod:`nsa_dist.deepspeed`). ``activation_checkpointing``: recompute each
    transformer block in backward (DeepSpeed's checkpointing under that backend). ``save_every``: DeepSpeed backend
    checkpoint interval in steps (None: only at the end). ``grad_clip``: largest global gradient norm, 0 turns
    clipping off (DeepSpeed's ``gradient_clipping`` meaning, in both backends).
    ``precision``: ``fp32`` or ``bf16`` (autocast of the forward, float32 weights and optimizer state; the plain
    backend; DeepSpeed takes its precision from the JSON's ``bf16`` section). ``eval_every``: also evaluate the
    held-out batches every that many steps (recorded in ``metrics["evals"]``; plain backend).
    ``keep_checkpoints``: the Ray launch (:mod:`nsa_dist.launch.ray`) keeps that many newest checkpoints in its
    storage and deletes older ones (Ray Train's ``CheckpointConfig(num_to_keep=...)``; null keeps all); the
    DeepSpeed files under ``<out_dir>/checkpoints`` are not pruned.
    ``loss_chunk_tokens``: when a rank's micro-batch holds more tokens than this, the LM head and cross-entropy
    run that many tokens at a time, never holding all ``[tokens, vocab]`` logits (:func:`.loss.chunked_head_loss`;
    0 turns it off).
    """
    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_batches: int = 4
    log_every: int = 10
    threads: Optional[int] = None
    cp: int = 1
    ulysses: int = 1
    grad_accum: int = 1
    activation_checkpointing: bool = False
    save_every: Optional[int] = None
    deepspeed_config: Optional[str] = None
    precision: str = "fp32"
    eval_every: Optional[int] = None
    keep_checkpoints: Optional[int] = 2
    loss_chunk_tokens: int = 4096

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batches", "log_every", "cp", "ulysses", "grad_accum"):
            check_positive_int(f"train.{name}", getattr(self, name))
        check_real("train.lr", self.lr, 0, low_open=True)
        check_real("train.min_lr_ratio", self.min_lr_ratio, 0, 1, note="the final lr as a fraction of train.lr")
        check_non_negative_int("train.warmup_steps", self.warmup_steps)
        check_non_negative_int("train.loss_chunk_tokens", self.loss_chunk_tokens)
        check_real("train.weight_decay", self.weight_decay, 0)
        check_real("train.grad_clip", self.grad_clip, 0, note="the largest gradient norm; 0 turns clipping off")
        self._check_betas()
        for name in ("threads", "save_every", "eval_every", "keep_checkpoints"):
            check_optional_positive_int(f"train.{name}", getattr(self, name))
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not one of {PRECISIONS}")
        check_bool("train.activation_checkpointing", self.activation_checkpointing)
        if self.deepspeed_config is not None and not isinstance(self.deepspeed_config, str):
            raise ValueError(f"train.deepspeed_config must be a path to a DeepSpeed JSON or null, got "
                             f"{self.deepspeed_config!r}")

    def _check_betas(self) -> None:
        """``betas`` must be two numbers in [0, 1) (AdamW's beta1, beta2); stored as a tuple."""
        if isinstance(self.betas, (str, bytes)) or not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"train.betas must be a list of two numbers [beta1, beta2] in [0, 1), got "
                             f"{self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_real(f"train.betas[{i}]", beta, 0, 1, high_open=True)
        self.betas = tuple(self.betas)


@dataclass
class TrainConfig:
    """Everything the main job needs; ``model`` fields are :class:`GPTConfig`'s (``vocab_size`` comes from data)."""
    model: Dict[str, Any]
    data: DataConfig
    train: OptimConfig
    seed: int = 0
    out_dir: str = "runs/default"

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        check_mapping("the config", values)
        values = dict(values)
        unknown = sorted(set(values) - {"model", "data", "train", "seed", "out_dir"})
        if unknown:
            raise ValueError(f"unknown top-level config keys {unknown}; valid: model, data, train, seed, out_dir")
        model = values.get("model")
        model = {} if model is None else model
        check_mapping("section 'model'", model)
        model = dict(model)
        if "vocab_size" in model:
            raise ValueError("model.vocab_size is set by the data (retrieval task or bytes); remove it from the config")
        train = _from_section(OptimConfig, values.get("train"), "train")
        if isinstance(model.get("nsa"), Mapping):  # a recipe's warm-up defaults to its fraction of train.steps
            model["nsa"] = with_recipe_warmup(model["nsa"], train.steps)
        config = cls(model=model, data=_from_section(DataConfig, values.get("data"), "data"), train=train,
                     seed=values.get("seed", 0), out_dir=values.get("out_dir", "runs/default"))
        check_non_negative_int("seed", config.seed)
        if not isinstance(config.out_dir, str) or not config.out_dir:
            raise ValueError(f"out_dir must be a directory path, got {config.out_dir!r}")
        config.check_context_parallel()  # validates the model section too
        return config

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """Read a training YAML (:func:`~nsa_dist.yaml_loader.load_yaml_mapping`: YAML 1.2 floats such as
        ``1e-3``; a missing, empty or non-mapping file is an error naming it) and validate it."""
        return cls.from_dict(load_yaml_mapping(path))

    def check_context_parallel(self) -> None:
        """With ``train.cp > 1`` ``data.seq_len`` must split into the CP layout (``model.nsa``'s ``cp_layout`` and
        ``select_len``; dense attention is sharded the same way); with ``train.ulysses > 1`` each CP shard must
        split into ``ulysses`` pieces and the heads over the Ulysses ranks (NSA attention only). Errors name the
        settings and values."""
        model = self.gpt_config(vocab_size=2)
        if self.data.short_steps > self.train.steps:
            raise ValueError(f"data.short_steps={self.data.short_steps} exceeds train.steps={self.train.steps}")
        cp, ulysses = self.train.cp, self.train.ulysses
        if cp * ulysses == 1:
            return
        nsa = model.nsa_config()
        if model.attention == "nsa" and nsa.selection_loss_weight:
            raise ValueError(f"model.nsa.selection_loss_weight={nsa.selection_loss_weight} is not supported with "
                             f"train.cp={cp}, train.ulysses={ulysses} (sequence parallelism); set it to 0 or train "
                             "on one rank")
        if ulysses > 1:
            if model.attention != "nsa":
                raise ValueError(f"train.ulysses={ulysses} applies to NSA attention only, not "
                                 f"model.attention={model.attention!r}; shard the sequence with train.cp instead")
            ulysses_local_heads(model.num_heads, model.num_kv_heads, ulysses, "train.ulysses")
        for name in ("seq_len", "short_seq_len"):
            length = getattr(self.data, name)
            if length is None:
                continue
            if cp > 1:
                if nsa.cp_layout == "per_document":
                    raise ValueError(f"model.nsa.cp_layout='per_document' needs packed documents (cu_seqlens), but "
                                     f"the training job feeds whole rows of data.{name}={length} tokens; use "
                                     "'zigzag' or 'contiguous'")
                CPLayout(cp, length, nsa.cp_layout, nsa.select_len)
            if length // cp % ulysses:
                raise ValueError(f"data.{name}={length} does not split over train.cp={cp} x train.ulysses={ulysses} "
                                 f"ranks: each context-parallel shard of {length // cp} tokens must be a multiple of "
                                 f"train.ulysses={ulysses}")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig.from_dict({**self.model, "vocab_size": vocab_size})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
