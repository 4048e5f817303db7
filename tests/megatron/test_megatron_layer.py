"""The Megatron NSA layer itself: it computes the same NSA as ``NativeSparseAttention``, rotates with Megatron's
own RoPE angles, and rejects what it does not support with errors that name the value."""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.helpers import gpt_cases  # noqa: E402
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402

from nsa_dist.megatron import NSATransformerConfig, cu_seqlens_from_packed_seq_params  # noqa: E402
from nsa_dist.megatron.rotary import RotaryTable  # noqa: E402
from nsa_dist.parallel import CPLayout  # noqa: E402
from nsa_dist.launch import run_local_group  # noqa: E402

pytestmark = pytest.mark.slow  # megatron-core models on spawned gloo ranks


@pytest.mark.parametrize("docs,rope,G,selection,full", [
    (None, False, 1, None, False), (None, True, 4, None, False), ((70, 9, 121), True, 2, None, False),
    ((150, 50), False, 4, None, False),
    ((70, 9, 121), True, 2, {"selection_scoring": "key_bound"}, False),  # nsa_selection_scoring reaches the layer
    ((150, 50), True, 4, None, True)])  # the full-selection warm-up switch
def test_layer_equals_native_sparse_attention(docs, rope, G, selection, full):
    ours, native = run_local_group(gpt_cases.layer_against_native, 1, docs, rope, G, selection, full,
                                   timeout=300)[0]
    assert ours.shape == native.shape
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, native, rtol=0, atol=1e-12)


def megatron_rope_table(S: int, D: int, percent: float, factor=None) -> torch.Tensor:
    """Megatron's RoPE angles ``[S, 1, 1, R]`` from its own ``RotaryEmbedding`` (CPU part of ``get_emb``)."""
    rope = RotaryEmbedding(kv_channels=D, rotary_percent=percent, rotary_base=500,
                           seq_len_interpolation_factor=factor, use_cpu_initialization=True)
    freqs = rope.get_freqs_non_repeated(S)
    return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


@pytest.mark.parametrize("percent,factor", [(1.0, None), (0.5, 2.0)])
def test_rotary_table_matches_megatron_rotation(percent, factor):
    S, B, H, D = 96, 2, 3, 32
    table = megatron_rope_table(S, D, percent, factor)
    x = torch.randn(B, S, H, D)
    expected = _apply_rotary_pos_emb_bshd(x.transpose(0, 1), table).transpose(0, 1)
    got = RotaryTable(table, torch.arange(S), D)(x, torch.arange(S))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # a context-parallel rank holds only its zigzag rows: the same positions rotate the same way
    rows = CPLayout(2, S, "zigzag").positions(1)
    local = RotaryTable(table[rows], rows, D)
    torch.testing.assert_close(local(x[:, rows], rows), expected[:, rows], rtol=0, atol=0)
    with pytest.raises(IndexError):
        local(x[:, :1], torch.tensor([0]))  # position 0 lives on rank 0: no angle here, no silent wrong one


def test_rotary_table_rejects_interleaved_and_wrong_rows():
    table = megatron_rope_table(16, 8, 1.0)
    with pytest.raises(ValueError, match="rotary_interleaved"):
        RotaryTable(table, torch.arange(16), 8, interleaved=True)
    with pytest.raises(ValueError, match="16 rows"):
        RotaryTable(table, torch.arange(12), 8)
    with pytest.raises(ValueError, match="head_dim=4"):
        RotaryTable(table, torch.arange(16), 4)


def test_config_errors_name_the_nsa_field():
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2)
    with pytest.raises(ValueError, match=r"nsa_stride.*stride=5|stride=5.*nsa_stride"):
        NSATransformerConfig(nsa_stride=5, **base)
    with pytest.raises(ValueError, match="compressor='conv'"):
        NSATransformerConfig(nsa_compressor="conv", **base)
    assert NSATransformerConfig(nsa_window=0, **base).nsa_window == 0


def test_packed_seq_params_errors():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    assert cu_seqlens_from_packed_seq_params(None) is None
    assert cu_seqlens_from_packed_seq_params(PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                             cu_seqlens_kv=cu)).tolist() == [0, 5, 12]
    with pytest.raises(ValueError, match="'sbhd'"):
        cu_seqlens_from_packed_seq_params(PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
    with pytest.raises(ValueError, match=r"\[0, 6, 12\]"):
        cu_seqlens_from_packed_seq_params(PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                          cu_seqlens_kv=torch.tensor([0, 6, 12])))


def test_cp_batch_split_names_the_lengths():
    for unpacked, packed, layer in run_local_group(gpt_cases.cp_batch_errors, 2, timeout=300):
        assert unpacked is not None and "chunk length 50" in unpacked and "T=200" in unpacked, unpacked
        assert "l'=16" in unpacked, unpacked
        for message in (packed, layer):  # the split and the NSA layer reject documents not in 2 * CP chunks
            assert message is not None and "cp_layout='per_document'" in message, message
            assert "divisible by 4" in message and "document 0 of length 98" in message, message


def test_cp_layout_is_megatron_cores_split():
    """Unpacked batches: zigzag; packed thd batches: per document (the layer's config for each)."""
    from nsa_dist.megatron import megatron_cp_layout, megatron_layout_kind, nsa_config_from_transformer_config

    config = NSATransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2)
    assert megatron_layout_kind(packed=False) == nsa_config_from_transformer_config(config).cp_layout == "zigzag"
    packed = nsa_config_from_transformer_config(config, packed=True)
    assert megatron_layout_kind(packed=True) == packed.cp_layout == "per_document"
    cu = torch.tensor([0, 8, 24], dtype=torch.int32)
    assert megatron_cp_layout(2, 24, 64, cu).positions(1).tolist() == [2, 3, 4, 5, *range(12, 20)]
    assert megatron_cp_layout(2, 256, 64).positions(1).tolist() == list(range(64, 192))


def test_missing_megatron_names_the_extra(monkeypatch):
    from nsa_dist.megatron.requirements import require_megatron

    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(ImportError, match=r"nsa-dist\[megatron\]"):
        require_megatron()


def test_recipe_switch_reaches_the_layer_config():
    from nsa_dist import NSAConfig
    from nsa_dist.megatron import nsa_config_from_transformer_config

    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2)
    got = nsa_config_from_transformer_config(NSATransformerConfig(nsa_recipe="retrieval",
                                                                  nsa_selection_warmup_steps=9, **base))
    assert got == NSAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, use_rope=False,
                            selection_scoring="key_bound", kv_sharing="shared", selection_warmup_steps=9)
    assert nsa_config_from_transformer_config(NSATransformerConfig(**base)).selection_scoring == "compressed"
    with pytest.raises(ValueError, match=r"nsa_recipe.*needs config.selection_warmup_steps > 0"):
        NSATransformerConfig(nsa_recipe="retrieval", **base)
    with pytest.raises(ValueError, match=r"config.nsa_recipe='fast' is not one of"):
        NSATransformerConfig(nsa_recipe="fast", **base)
