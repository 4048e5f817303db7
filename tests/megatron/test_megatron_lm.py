"""Megatron-LM's paths into the NSA layer: ``--spec nsa_dist.megatron nsa_layer_spec`` through megatron-core's own
``import_module``, ``--nsa-*`` arguments (``add_nsa_arguments``) reaching the layer of a plain
``TransformerConfig`` as Megatron-LM builds it, specs from megatron-core backend providers (local and a stand-in
for Transformer Engine's), and the ``cp_comm_type`` values NSA replaces or refuses."""
from __future__ import annotations

import argparse
import re
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.models.backends import LocalSpecProvider  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402

from nsa_dist import NSAConfig  # noqa: E402
from nsa_dist.launch import run_local_group  # noqa: E402
from nsa_dist.megatron import (NSATransformerConfig, add_nsa_arguments, default_backend,  # noqa: E402
                               get_gpt_layer_nsa_spec, nsa_config_from_transformer_config, nsa_fields_from_args)
from nsa_dist.megatron.attention import _warn_replaced_cp_comm_type, check_cp_comm_type  # noqa: E402
from nsa_dist.megatron.norm import SequenceParallelTorchNorm  # noqa: E402

ARGV = ["--nsa-block-len", "8", "--nsa-stride", "4", "--nsa-select-len", "16", "--nsa-top-n", "3", "--nsa-window",
        "24", "--nsa-recipe", "retrieval", "--nsa-selection-warmup-steps", "3"]
BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2)
EXPECTED = NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, use_rope=False, block_len=8, stride=4,
                     select_len=16, top_n=3, window=24, selection_scoring="key_bound", kv_sharing="shared",
                     selection_warmup_steps=3)


def parse(argv):
    """``argv`` parsed by a parser that only has the NSA arguments (as Megatron-LM's gets them)."""
    return add_nsa_arguments(argparse.ArgumentParser()).parse_args(argv)


def as_megatron_lm(args) -> None:
    """What Megatron-LM's ``set_args`` leaves behind: its parsed arguments in ``megatron.training.global_vars``."""
    sys.modules["megatron.training.global_vars"] = types.SimpleNamespace(_GLOBAL_ARGS=args)


class StandInColumn(ColumnParallelLinear):
    """A stand-in backend's column-parallel linear (megatron-core's, under another class)."""


class StandInRow(RowParallelLinear):
    """A stand-in backend's row-parallel linear."""


class StandInNorm(SequenceParallelTorchNorm):
    """A stand-in backend's norm."""


class StandInFused(StandInColumn):
    """A stand-in for a norm fused into the MLP's first linear (only placed in specs, never built here)."""


class StandInBackend(LocalSpecProvider):
    """A megatron-core backend provider with its own classes, standing in for ``TESpecProvider``."""

    def __init__(self, fused: bool = False):
        self.fused = fused

    def column_parallel_linear(self):
        return StandInColumn

    def row_parallel_linear(self):
        return StandInRow

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        return StandInNorm

    def fuse_layernorm_and_linear(self):
        return self.fused

    def column_parallel_layer_norm_linear(self):
        return StandInFused if self.fused else None


def test_nsa_arguments_parse_into_the_config():
    args = parse(ARGV)
    assert (args.nsa_window, args.nsa_top_n, args.nsa_recipe, args.nsa_compressor) == (24, 3, "retrieval", "mlp")
    config = NSATransformerConfig(**BASE, **nsa_fields_from_args(args))
    assert nsa_config_from_transformer_config(config) == EXPECTED
    assert nsa_fields_from_args(parse([])) == {k: v for k, v in vars(NSATransformerConfig(**BASE)).items()
                                               if k.startswith("nsa_")}  # the defaults are the config's
    with pytest.raises(SystemExit):
        parse(["--nsa-recipe", "fast"])


def test_nsa_argument_types_follow_the_annotations(monkeypatch):
    """Each --nsa-* argument parses as its field's annotated type (Optional ones too); a bool parses "false" as
    False; an annotation the parser cannot handle is a TypeError naming the field."""
    from nsa_dist.megatron import arguments

    args = parse(["--nsa-selection-loss-weight", "0.5", "--nsa-compressor-hidden", "8", "--nsa-v-head-dim", "24",
                  "--nsa-kv-sharing", "shared"])
    assert (args.nsa_selection_loss_weight, args.nsa_compressor_hidden, args.nsa_v_head_dim, args.nsa_kv_sharing) \
        == (0.5, 8, 24, "shared")
    assert type(args.nsa_selection_loss_weight) is float and type(args.nsa_v_head_dim) is int
    assert [arguments.parse_bool(t) for t in ("false", "True", "0", "yes")] == [False, True, False, True]
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'maybe'"):
        arguments.parse_bool("maybe")
    field = NSATransformerConfig.__dataclass_fields__["nsa_window"]
    monkeypatch.setattr(field, "type", "Tuple[int, int]")
    with pytest.raises(TypeError, match=r"NSATransformerConfig.nsa_window is annotated 'Tuple\[int, int\]'"):
        arguments.argument_type("nsa_window")


def test_plain_config_takes_megatron_lm_arguments_and_config_fields_win(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", types.SimpleNamespace(_GLOBAL_ARGS=parse(ARGV)))
    assert nsa_config_from_transformer_config(TransformerConfig(**BASE)) == EXPECTED
    config = NSATransformerConfig(**BASE, nsa_window=40)  # the config's own fields come first
    assert nsa_config_from_transformer_config(config).window == 40
    assert nsa_config_from_transformer_config(config).block_len == 32
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", types.SimpleNamespace(_GLOBAL_ARGS=None))
    assert nsa_config_from_transformer_config(TransformerConfig(**BASE)).window == 512  # not parsed yet: the paper's


def test_cp_comm_type_warns_once_or_is_refused():
    _warn_replaced_cp_comm_type.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in (None, "p2p", "p2p", "all_gather"):
            check_cp_comm_type(value)
    assert [str(w.message).split(" is ")[0] for w in caught] == ["cp_comm_type='p2p'", "cp_comm_type='all_gather'"]
    assert "NSA brings its own context-parallel exchange" in str(caught[0].message)
    for value in ("a2a", "a2a+p2p", "ring"):
        with pytest.raises(ValueError, match=re.escape(f"cp_comm_type='{value}' cannot be honoured by the NSA layer")):
            check_cp_comm_type(value)


def test_default_backend_is_local_without_transformer_engine():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        assert type(default_backend()) is LocalSpecProvider
    else:
        assert type(default_backend()).__name__ == "TESpecProvider"


def test_spec_places_the_backend_modules():
    spec = get_gpt_layer_nsa_spec(backend=StandInBackend(fused=True)).submodules
    attention = spec.self_attention.submodules
    assert (attention.linear_qg, attention.linear_kv, attention.linear_proj) == (StandInColumn, StandInColumn,
                                                                               StandInRow)
    assert spec.input_layernorm is StandInNorm
    # a fused backend's MLP holds the pre-MLP norm, as megatron-core's Transformer Engine spec does
    assert spec.pre_mlp_layernorm is IdentityOp and spec.mlp.submodules.linear_fc1 is StandInFused
    assert spec.sharded_state_dict_keys_map == {}
    local = get_gpt_layer_nsa_spec(backend=LocalSpecProvider()).submodules
    assert local.pre_mlp_layernorm is local.input_layernorm
    assert local.sharded_state_dict_keys_map == {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def megatron_lm_gpt(rank: int, world: int):
    """Builds GPTs as Megatron-LM's ``gpt_builder`` does for ``--spec nsa_dist.megatron nsa_layer_spec`` (plain
    ``TransformerConfig``, ``--nsa-*`` parsed) and from the stand-in backend; returns each model's attention
    classes and NSA settings, the first model's loss after a forward and backward, and the ``cp_comm_type``
    error."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import build_module, import_module

    from nsa_dist.megatron import NSASelfAttention, get_nsa_attention_spec

    from tests.helpers import gpt_cases

    gpt_cases.cpu_shim()
    gpt_cases.init_parallel(1, 1)
    as_megatron_lm(parse(ARGV))
    config = TransformerConfig(**BASE, ffn_hidden_size=128, use_cpu_initialization=True, hidden_dropout=0.0,
                               attention_dropout=0.0)
    out = {}
    for name, spec in (("--spec", import_module(("nsa_dist.megatron", "nsa_layer_spec"))),
                       ("stand-in", get_gpt_layer_nsa_spec(backend=StandInBackend()))):
        torch.manual_seed(0)
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=96, max_sequence_length=256,
                         position_embedding_type="learned_absolute")
        layers = [m for m in model.modules() if isinstance(m, NSASelfAttention)]
        out[name] = dict(nsa=[layer.nsa for layer in layers], kv_rows=layers[0].linear_kv.weight.shape[0],
                         classes={type(getattr(layers[0], n)).__name__ for n in ("linear_qg", "linear_kv",
                                                                                 "linear_proj")},
                         norm=type(model.decoder.layers[0].input_layernorm).__name__)
        if name == "--spec":
            tokens = torch.randint(0, 96, (2, 257))
            loss = model(tokens[:, :-1], torch.arange(256)[None].expand(2, -1), None, labels=tokens[:, 1:]).mean()
            loss.backward()
            out[name]["loss"] = float(loss)
    try:
        build_module(get_nsa_attention_spec(), config=config, layer_number=1, cp_comm_type="a2a")
    except ValueError as err:
        out["cp_comm_type error"] = str(err)
    return out


@pytest.mark.slow  # megatron-core models on a spawned gloo rank
def test_megatron_lm_spec_and_arguments_reach_the_layers():
    out = run_local_group(megatron_lm_gpt, 1, timeout=300)[0]
    spec, stand_in = out["--spec"], out["stand-in"]
    assert spec["nsa"] == [EXPECTED, EXPECTED] and stand_in["nsa"] == [EXPECTED, EXPECTED]
    assert spec["kv_rows"] == 2 * 1 * (16 + 16)  # shared K/V (the retrieval recipe): one K/V set per head
    assert spec["classes"] == {"ColumnParallelLinear", "RowParallelLinear"}
    assert spec["norm"] == "LayerNorm" and torch.isfinite(torch.tensor(spec["loss"]))
    assert stand_in["classes"] == {"StandInColumn", "StandInRow"} and stand_in["norm"] == "LayerNorm"
    assert "cp_comm_type='a2a' cannot be honoured" in out["cp_comm_type error"]
