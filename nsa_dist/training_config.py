"""The training job's configuration: a YAML file with ``model``, ``data`` and ``train`` sections."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from nsa_kernels.validation import check_non_negative_int

from .data import RetrievalTask
from .models import GPTConfig
from .parallel.layout import CPLayout

DATA_KINDS = ("retrieval", "text")
PRECISIONS = ("fp32", "bf16")


def _from_section(cls, values: Optional[Dict[str, Any]], section: str):
    values = dict(values or {})
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
        if isinstance(self.valid_fraction, bool) or not isinstance(self.valid_fraction, (int, float)) or not (
                0 <= self.valid_fraction < 0.5):
            raise ValueError(f"data.valid_fraction must be a number in [0, 0.5), got {self.valid_fraction!r}")
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
    tokens and selected blocks; dense attention all-gathers K/V). Without DeepSpeed they run as local gloo processes on the CPU (``threads`` are shared among them); under the DeepSpeed
    backend the launcher's ranks form groups of ``cp`` consecutive ranks and data parallelism spans the rest.
    ``deepspeed_config``: a DeepSpeed JSON (e.g. ``configs/deepspeed/zero3.json``) selects the DeepSpeed backend
    (launch with ``deepspeed``; see :mod:`nsa_dist.deepspeed`). ``activation_checkpointing``: recompute each
    transformer block in backward (DeepSpeed's checkpointing under that backend). ``save_every``: DeepSpeed backend
    checkpoint interval in steps (None: only at the end).
    ``precision``: ``fp32`` or ``bf16`` (autocast of the forward, float32 weights and optimizer state; the plain
    backend; DeepSpeed takes its precision from the JSON's ``bf16`` section). ``eval_every``: also evaluate the
    held-out batches every that many steps (recorded in ``metrics["evals"]``; plain backend).
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
    grad_accum: int = 1
    activation_checkpointing: bool = False
    save_every: Optional[int] = None
    deepspeed_config: Optional[str] = None
    precision: str = "fp32"
    eval_every: Optional[int] = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batches", "log_every", "cp", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        for name in ("save_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"train.{name} must be a positive int or null, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not one of {PRECISIONS}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"train.activation_checkpointing must be true or false, got "
                             f"{self.activation_checkpointing!r}")
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
        values = dict(values)
        unknown = sorted(set(values) - {"model", "data", "train", "seed", "out_dir"})
        if unknown:
            raise ValueError(f"unknown top-level config keys {unknown}; valid: model, data, train, seed, out_dir")
        model = dict(values.get("model") or {})
        if "vocab_size" in model:
            raise ValueError("model.vocab_size is set by the data (retrieval task or bytes); remove it from the config")
        config = cls(model=model, data=_from_section(DataConfig, values.get("data"), "data"),
                     train=_from_section(OptimConfig, values.get("train"), "train"),
                     seed=values.get("seed", 0), out_dir=values.get("out_dir", "runs/default"))
        config.check_context_parallel()  # validates the model section too
        return config

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {})

    def check_context_parallel(self) -> None:
        """With ``train.cp > 1`` ``data.seq_len`` must split into the CP layout (``model.nsa``'s ``cp_layout`` and
        ``select_len``; dense attention is sharded the same way)."""
        model = self.gpt_config(vocab_size=2)
        if self.data.short_steps > self.train.steps:
            raise ValueError(f"data.short_steps={self.data.short_steps} exceeds train.steps={self.train.steps}")
        if self.train.cp == 1:
            return
        nsa = model.nsa_config()
        for length in (self.data.seq_len, self.data.short_seq_len):
            if length is not None:
                CPLayout(self.train.cp, length, nsa.cp_layout, nsa.select_len)

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig.from_dict({**self.model, "vocab_size": vocab_size})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
