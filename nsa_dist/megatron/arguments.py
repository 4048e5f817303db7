"""NSA hyper-parameters on a Megatron-style command line: ``--nsa-block-len``, ``--nsa-top-n``, ``--nsa-window``,
``--nsa-recipe``, ... (one argument per ``nsa_*`` field of :class:`NSATransformerConfig`, same name and default).

With Megatron-LM, pass :func:`add_nsa_arguments` as ``pretrain(..., extra_args_provider=add_nsa_arguments)``; its
``core_transformer_config_from_args`` builds a plain ``TransformerConfig`` without these fields, so the NSA layer
reads them from Megatron-LM's parsed arguments (:func:`nsa_dist.megatron.config.megatron_lm_args`). Scripts that
build their own config pass :func:`nsa_fields_from_args` to :class:`NSATransformerConfig`.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

from ..recipes import RECIPES
from .config import NSATransformerConfig

ARGUMENT_FIELDS = [name for name in NSATransformerConfig.__dataclass_fields__ if name.startswith("nsa_")]


def add_nsa_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add an "NSA" argument group with ``--nsa-*`` for every ``nsa_*`` field of :class:`NSATransformerConfig`
    (its type and default, the paper's values) to ``parser`` and return the parser (Megatron-LM's
    ``extra_args_provider`` contract). ``--nsa-recipe`` takes the names of :data:`nsa_dist.recipes.RECIPES`."""
    group = parser.add_argument_group("NSA", "Native Sparse Attention hyper-parameters (nsa_dist.NSAConfig)")
    for name in ARGUMENT_FIELDS:
        default = NSATransformerConfig.__dataclass_fields__[name].default
        choices = {"choices": tuple(RECIPES)} if name == "nsa_recipe" else {}
        group.add_argument(f"--{name.replace('_', '-')}", type=int if default is None else type(default),
                           default=default, help=f"NSATransformerConfig.{name} (default: %(default)s)", **choices)
    return parser


def nsa_fields_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``nsa_*`` fields of :class:`NSATransformerConfig` from arguments parsed with :func:`add_nsa_arguments`:
    ``NSATransformerConfig(..., **nsa_fields_from_args(args))``."""
    return {name: getattr(args, name) for name in ARGUMENT_FIELDS}
