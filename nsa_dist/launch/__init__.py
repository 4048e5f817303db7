"""Launching: which launcher started this process (torchrun, ``deepspeed``, Open MPI / MPICH / Intel MPI, Slurm)
and where its ranks meet (:func:`discover_launch`, :func:`export_torch_env`)."""
from .env import (DEFAULT_MASTER_PORT, LaunchInfo, discover_launch, expand_slurm_nodelist, export_torch_env,
                  first_slurm_host, launcher_present, parse_slurm_tasks_per_node)

__all__ = ["DEFAULT_MASTER_PORT", "LaunchInfo", "discover_launch", "expand_slurm_nodelist", "export_torch_env",
           "first_slurm_host", "launcher_present", "parse_slurm_tasks_per_node"]
