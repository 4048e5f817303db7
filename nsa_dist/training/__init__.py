"""The training job: its configuration and what its two backends share, the plain backend (one process, or
``--cp N`` local gloo processes) and the DeepSpeed backend (one process per launcher rank).

Modules, in dependency order: :mod:`.config` (the YAML: ``model``, ``data``, ``train``), :mod:`.context_parallel`
(the context-parallel group a rank trains in), :mod:`.data`, :mod:`.loss`, :mod:`.optimizer` and
:mod:`.evaluation` (shared by both backends), then the backends :mod:`.plain` and :mod:`.deepspeed_backend`.
``nsa_dist.train`` is the command line and picks the backend.
"""
from .config import DataConfig, OptimConfig, TrainConfig
from .context_parallel import ContextParallelGroup, use_context_parallel
from .deepspeed_backend import train_deepspeed
from .plain import train_plain

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "ContextParallelGroup", "use_context_parallel",
           "train_deepspeed", "train_plain"]
