"""A megatron-core GPT built from ``get_gpt_layer_nsa_spec`` on gloo CPU ranks: context, tensor and sequence
parallel runs equal the single-rank model (loss and every parameter's gradient), and distributed checkpoints
save, load and reshard to the identical next loss.

Models are float64. Megatron's vocab-parallel cross-entropy computes in float32, so wherever TP splits the
vocabulary the gradients carry float32 rounding (observed <= 3e-8 relative); without TP they match to float64
rounding (observed <= 2e-15 relative). The float32 per-token losses are summed in a different grouping per
layout, so losses are compared at 1e-6 relative.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("megatron.core")

from nsa_dist.launch import run_local_group  # noqa: E402

from tests.helpers import gpt_cases  # noqa: E402
from tests.helpers.gpt_cases import GPTCase  # noqa: E402

pytestmark = pytest.mark.slow  # megatron-core models on spawned gloo ranks

# packed documents (thd) are split per document as megatron-core splits them: each in 2 * CP chunks
PACKED = (100, 20, 136)  # CP = 2: chunks of 25, 5 and 34 tokens, not multiples of l' = 16
PACKED_CP4 = (104, 16, 136)  # CP = 4: chunks of 13, 2 and 17 tokens

CASES = {
    # id: (case, TP, CP, sequence parallel)
    "cp2-rope-batch2": (GPTCase(), 1, 2, False),
    "cp2-packed-partial-rope": (GPTCase(docs=PACKED, rotary_percent=0.5, seed=1), 1, 2, False),
    "cp2-learned-positions": (GPTCase(rope=False, seed=2), 1, 2, False),
    "cp2-shared-kv-mean": (GPTCase(seed=3, nsa=dict(nsa_block_len=8, nsa_stride=4, nsa_select_len=16, nsa_top_n=3,
                                                    nsa_window=24, nsa_compressor="linear",
                                                    nsa_kv_sharing="shared")), 1, 2, False),
    "tp2": (GPTCase(seed=4), 2, 1, False),
    "tp2-kv-heads-replicated": (GPTCase(groups=1, seed=5), 2, 1, False),
    "tp2-sequence-parallel": (GPTCase(seed=6), 2, 1, True),
    "tp2-cp2-sp-packed": (GPTCase(docs=PACKED, seed=7), 2, 2, True),
    "cp2-packed-G1": (GPTCase(docs=(44, 4, 120, 88), groups=4, seed=8), 1, 2, False),
    "cp4-packed-G4": (GPTCase(docs=PACKED_CP4, groups=1, seed=9), 1, 4, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_gpt_equals_single_rank(name):
    case, tp, cp, sp = CASES[name]
    loss, ref_loss, diffs, scales = run_local_group(gpt_cases.compare_with_single_rank, tp * cp, case, tp, cp, sp,
                                                    timeout=600)[0]
    # the per-token losses are float32 (megatron's cross-entropy), so their sum depends on how ranks group it
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (loss, ref_loss)
    rel = 1e-6 if tp > 1 else 1e-12
    assert set(diffs) == set(scales) and len(diffs) > 20
    attention = [n for n in scales if ".self_attention." in n]
    assert all(scales[n] > 0 for n in attention), [n for n in attention if scales[n] == 0]  # gradients reach NSA
    # + 1e-15: a gradient that is zero in exact arithmetic (e.g. the compressed keys' bias without rope, which
    # shifts every score of a query equally) comes out as ~1e-19 noise
    bad = {n: (diffs[n], scales[n]) for n in diffs if diffs[n] > rel * scales[n] + 1e-15}
    assert not bad, bad


@pytest.mark.parametrize("save,load", [((2, 1), (2, 1)), ((2, 1), (1, 2)), ((1, 2), (2, 1))],
                         ids=["tp2-to-tp2", "tp2-to-cp2", "cp2-to-tp2"])
def test_checkpoint_round_trip_gives_the_same_next_loss(tmp_path, save, load):
    case = GPTCase(seed=11)
    results = run_local_group(gpt_cases.checkpoint_round_trip, 2, case, save, load, os.path.join(tmp_path, "ckpt"),
                              timeout=600)
    for next_loss, loaded_loss in results:
        if save == load:
            assert next_loss == loaded_loss
        else:  # resharding the vocabulary changes megatron's float32 cross-entropy rounding
            assert abs(next_loss - loaded_loss) <= 1e-6 * abs(next_loss), (next_loss, loaded_loss)
