"""NSA hyper-parameters on a Megatron-style command line: ``--nsa-block-len``, ``--nsa-top-n``, ``--nsa-window``,
``--nsa-recipe``, ... (one argument per ``nsa_*`` field of :class:`NSATransformerConfig`, same name and default).

With Megatron-LM, pass :func:`add_nsa_arguments` as ``extra_args_provider`` (to ``pretrain`` before megatron-core
0.19, to ``parse_and_validate_args`` from 0.19); its ``core_transformer_config_from_args`` builds a plain
``TransformerConfig`` without these fields, so the NSA layer reads them from Megatron-LM's parsed arguments (:func:`nsa_dist.megatron.config.megatron_lm_args`). Scripts that
build their own config pass :func:`nsa_fields_from_args` to :class:`NSATransformerConfig`.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

from ..recipes import RECIPES
from .config import NSATransformerConfig

ARGUMENT_FIELDS = [name for name in NSATransformerConfig.__dataclass_fields__ if name.startswith("nsa_")]


def parse_bool(text: str) -> bool:
    """``"true"``/``"1"``/``"yes"`` -> True, ``"false"``/``"0"``/``"no"`` -> False (any case); else the
    ``argparse.ArgumentTypeError`` argparse reports with the argument's name."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


_ARGUMENT_TYPES = {"int": int, "float": float, "str": str, "bool": parse_bool}


def argument_type(name: str):
    """The argparse ``type`` of field ``name`` of :class:`NSATransformerConfig`, from its annotation (``int``,
    ``float``, ``str``, ``bool`` or ``Optional`` of one); TypeError naming the field for any other annotation."""
    annotation = str(NSATransformerConfig.__dataclass_fields__[name].type)
    inner = annotation[len("Optional["):-1] if annotation.startswith("Optional[") else annotation
    if inner not in _ARGUMENT_TYPES:
        raise TypeError(f"NSATransformerConfig.{name} is annotated {annotation!r}: add_nsa_arguments parses only "
                        f"{', '.join(_ARGUMENT_TYPES)} (or Optional of one)")
    return _ARGUMENT_TYPES[inner]


def add_nsa_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add an "NSA" argument group with ``--nsa-*`` for every ``nsa_*`` field of :class:`NSATransformerConfig`
    (the type of its annotation, :func:`argument_type`, and its default, the paper's values) to ``parser`` and
    return the parser (Megatron-LM's ``extra_args_provider`` contract). ``--nsa-recipe`` takes the names of :data:`nsa_dist.recipes.RECIPES`."""
    group = parser.add_argument_group("NSA", "Native Sparse Attention hyper-parameters (nsa_dist.NSAConfig)")
    for name in ARGUMENT_FIELDS:
        default = NSATransformerConfig.__dataclass_fields__[name].default
        choices = {"choices": tuple(RECIPES)} if name == "nsa_recipe" else {}
        group.add_argument(f"--{name.replace('_', '-')}", type=argument_type(name), default=default, help=f"NSATransformerConfig.{name} (default: %(default)s)", **choices)
    return parser


def nsa_fields_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``nsa_*`` fields of :class:`NSATransformerConfig` from arguments parsed with :func:`add_nsa_arguments`:
    ``NSATransformerConfig(..., **nsa_fields_from_args(args))``."""
    return {name: getattr(args, name) for name in ARGUMENT_FIELDS}
