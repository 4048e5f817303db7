"""Triton NSA decode step (``nsa_kernels.triton.nsa_decode``) against ``nsa_dist.inference.nsa_decode_reference``.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``) on
small random caches (:class:`~nsa_dist.inference.DecodeKV` built directly: rows past a sequence's length hold
garbage the kernels must not read); ``@pytest.mark.gpu`` runs a 16k context at HQ 64, H 4, D 128 in bf16. Fresh
seeds from the ``seed`` fixture (replay with ``NSA_TEST_SEED=<seed>``). The compressed scoring is the kernel's own:
its block indices must equal the reference's.
"""
from __future__ import annotations

import pytest
import torch

from nsa_kernels import NSAGeometry
from nsa_dist.inference import nsa_decode_reference
from nsa_dist.inference.decode_reference import compressed_decode, decode_block_indices
from tests.helpers.decode_cases import random_cache

decode = pytest.importorskip("nsa_kernels.triton.nsa_decode", reason="needs the triton package")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # Triton under the CPU interpreter

# l = 8, d = 4, l' = 16, n = 4, w = 12: 101 tokens hold 6 selection blocks, so top-n leaves some out
GEOMETRY = NSAGeometry(block_len=8, stride=4, select_len=16, top_n=4, window=12, init_blocks=1, local_blocks=2)
LENGTHS = (70, 101, 5)  # not multiples of d, l or l'; the last sequence sees no compressed block


def reference_indices(q, positions, kv, geometry, scoring="compressed"):
    scale = q.shape[-1] ** -0.5
    q = q.float()
    _, lse = compressed_decode(q, positions, kv.k_cmp.float(), kv.v_cmp.float(), geometry, scale)
    return decode_block_indices(q, positions, kv, lse, geometry, scoring, scale)


def check(seed, lengths=LENGTHS, S=1, H=2, G=4, shared=False, geometry=GEOMETRY, Dk=16, Dv=16, q_gain=1.0):
    q, positions, kv, gates = random_cache(lengths, S, H, G, Dk, Dv, geometry, shared, max(lengths) + S + 3)
    q = q * q_gain
    out, idx = decode.nsa_decode(q, positions, kv, gates, geometry, return_indices=True)
    msg = f"seed {seed}"
    assert torch.equal(idx, reference_indices(q, positions, kv, geometry)), msg
    torch.testing.assert_close(out, nsa_decode_reference(q, positions, kv, gates, geometry), atol=2e-5, rtol=2e-5,
                               msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
def test_matches_reference(seed, G, shared):
    check(seed, G=G, shared=shared)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("S", [2, 3])
def test_speculative_queries(seed, S, shared):
    check(seed, S=S, shared=shared)


def test_no_window_and_dk_neq_dv(seed):
    check(seed, geometry=GEOMETRY._replace(window=0), Dk=24, Dv=8)


@pytest.mark.parametrize("programs", [1, 64], ids=["one_split", "many_splits"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
def test_window_of_several_key_tiles(seed, programs, shared, monkeypatch):
    """A window of 100 keys (two key tiles of 64) and top-n 8, in one split or cut into as many as there is work."""
    monkeypatch.setattr(decode, "INTERPRETER_PROGRAMS", programs)
    check(seed, lengths=(150, 83), H=1, shared=shared, geometry=GEOMETRY._replace(window=100, top_n=8))


@pytest.mark.parametrize("programs", [1, 64], ids=["one_split", "many_splits"])
def test_compressed_rows_in_several_splits(seed, programs, monkeypatch):
    """l' = d = 4: a chunk of 16 selection blocks holds 16 compressed rows, so 101 tokens make 2 chunks, each
    compressed row reaching into the next block (l/d = 2): one split, or one per chunk whose top lists merge. Peaked
    attention (queries x 4) over 8 heads: each head's lse (merged from the splits) weighs its share of the scores."""
    monkeypatch.setattr(decode, "INTERPRETER_PROGRAMS", programs)
    check(seed, lengths=(101, 60), H=1, G=8, geometry=GEOMETRY._replace(select_len=4, top_n=5), q_gain=4.0)


def test_paper_geometry(seed):
    """l 32, d 16, l' 64, n 16, w 512 on 1500 and 2100 tokens (33 candidate blocks)."""
    check(seed, lengths=(1500, 2100), H=1, G=4, geometry=NSAGeometry(32, 16, 64, 16, 512, 1, 2), Dk=32, Dv=32)


@pytest.mark.parametrize("scoring", ["max_logit", "key_bound"])
def test_other_scorings_take_the_given_selection(seed, scoring):
    """Scorings the kernels do not compute: the reference's indices come in as ``block_idx`` (here max-logit's,
    computed from the selection keys) and the output equals the reference's; without them, a clear error."""
    q, positions, kv, gates = random_cache(LENGTHS, 1, 2, 4, 16, 16, GEOMETRY, False, 110)
    if scoring == "key_bound":
        with pytest.raises(ValueError, match="selection_scoring='key_bound'.*block_idx"):
            decode.nsa_decode(q, positions, kv, gates, GEOMETRY, scoring)
        return
    idx = reference_indices(q, positions, kv, GEOMETRY, scoring)
    out = decode.nsa_decode(q, positions, kv, gates, GEOMETRY, scoring, block_idx=idx)
    torch.testing.assert_close(out, nsa_decode_reference(q, positions, kv, gates, GEOMETRY, scoring), atol=2e-5,
                               rtol=2e-5, msg=lambda m: f"seed {seed}: {m}")


def test_more_queries_than_one_launch_takes(seed):
    """18 queries per sequence: the kernels stack 16, so the step runs in two launches."""
    check(seed, lengths=(40, 23), S=18, H=1, G=1)


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
def test_gpu_bf16_16k(seed, shared):
    """HQ 64, H 4, D 128, bf16, paper geometry, two sequences near 16k tokens: the kernel against the fp32
    reference on the same bf16 cache. Block scores agree to fp32 rounding, so a rare near-tie may pick another
    block: at least 98% of the (query, KV head) selections must be equal, and the rows whose whole group selected
    the same blocks must match within bf16 tolerance."""
    geometry = NSAGeometry(32, 16, 64, 16, 512, 1, 2)
    q, positions, kv, gates = random_cache((16_000, 16_381), 1, 4, 16, 128, 128, geometry, shared, 16_384,
                                           torch.bfloat16, "cuda")
    out, idx = decode.nsa_decode(q, positions, kv, gates, geometry, return_indices=True)
    same = (idx == reference_indices(q, positions, kv, geometry)).all(-1)  # [B, S, H]
    assert same.float().mean() >= 0.98, f"seed {seed}: {same.float().mean():.3f} of the selections agree"
    rows = same.repeat_interleave(16, dim=2)  # per query head
    ref = nsa_decode_reference(q, positions, kv, gates, geometry)
    torch.testing.assert_close(out[rows].float(), ref[rows].float(), atol=2e-2, rtol=2e-2,
                               msg=lambda m: f"seed {seed}: {m}")
