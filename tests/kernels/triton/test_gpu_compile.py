"""Every Triton kernel compiles for sm_90 (H100/H200) with the tile configurations the GPU runs take, on the CPU.

The interpreter tests check what the kernels compute; this checks that Triton's compiler and ptxas accept them
(:mod:`tests.helpers.triton_launches`): the launches of a few workloads (the paper configuration, the small-group
training configuration with max-logit scoring and shared K/V, the key-bound scoring in fp32 as the GPU tests run
it, the branch ops on their own, decoding) are recorded under the interpreter, in the dtypes a GPU gets, and
compiled for sm_90, each within an SM's shared memory. The workloads are small in T, but the tile configurations
depend on the group size, head dims and block sizes only (and the selection's n), which are those of the GPU runs.
And every ``*_kernel`` of ``nsa_kernels.triton`` must be among the compiled ones, so that a new kernel is covered
or this test says which is not.

The compiler is this environment's Triton; ``NSA_COMPILE_TRITON_PATH=/tmp/triton36`` after ``pip install --no-deps
--target /tmp/triton36 triton==3.6.0`` compiles with the GPU image's Triton instead; ``NSA_COMPILE_REPORT=path.json``
writes every launch's record (shared memory, registers, stack and local bytes per thread) there.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
from pathlib import Path

import pytest
import torch

import nsa_kernels
from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_kernels import NSAGeometry
from tests.helpers.decode_cases import random_cache
from tests.helpers.triton_launches import SM90_SHARED_MEMORY, compile_for_gpu, recorded_launches

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

PAPER = dict(block_len=32, stride=16, select_len=64, top_n=16, window=512)  # the paper's geometry
SMALL = dict(block_len=16, stride=8, select_len=16, top_n=4, window=32)  # many blocks per query in a short T
PACKED = [0, 70, 301]  # two documents, lengths not multiples of any block size
REPORT_VARIABLE = "NSA_COMPILE_REPORT"  # a JSON path: every workload's compile records (shared memory, registers)


def module_step(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, geometry: dict, **options) -> None:
    """Forward and backward of a ``NativeSparseAttention`` layer on the Triton backend over the packed rows."""
    cfg = NSAConfig(hidden_size=64, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, **geometry,
                    **options)
    layer = NativeSparseAttention(cfg).to(dtype)
    x = torch.randn(1, PACKED[-1], 64, dtype=dtype, requires_grad=True)
    with nsa_kernels.use_backend("triton"):
        out = layer(x, cu_seqlens=torch.tensor(PACKED, dtype=torch.int32))
    out.float().square().sum().backward()


def branch_ops(dtype: torch.dtype) -> None:
    """The compressed, selected and window ops one at a time (their own delta pass in backward), G = 2."""
    T, H, G, D = PACKED[-1], 2, 2, 64
    cu = torch.tensor(PACKED, dtype=torch.int32)
    geo = SMALL
    n_cmp = nsa_kernels.total_compressed_blocks(T, geo["block_len"], geo["stride"], cu)

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    q, k_cmp, v_cmp = rand(1, T, G * H, D), rand(1, n_cmp, H, D), rand(1, n_cmp, H, D)
    k, v = rand(1, T, H, D), rand(1, T, H, D)
    with nsa_kernels.use_backend("triton"):
        o_cmp, lse = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, geo["block_len"], geo["stride"],
                                                      cu_seqlens=cu)
        idx = nsa_kernels.select_blocks(q, k_cmp, lse, geo["block_len"], geo["stride"], geo["select_len"],
                                        geo["top_n"], cu_seqlens=cu)
        o_slc = nsa_kernels.selected_attention(q, k, v, idx, geo["select_len"], cu_seqlens=cu)
        o_win = nsa_kernels.window_attention(q, k, v, geo["window"], cu_seqlens=cu)
    (o_cmp.float().sum() + o_slc.float().sum() + o_win.float().sum()).backward()


def decode(dtype: torch.dtype, shared: bool, scoring: str, tokens: int = 1) -> None:
    """One decode step of the paper's head shape (G 16, D 128) over a random cache of two sequences."""
    from nsa_kernels.triton.nsa_decode import nsa_decode

    geometry = NSAGeometry(block_len=32, stride=16, select_len=64, top_n=4, window=64, init_blocks=1,
                           local_blocks=2)
    lengths = (300, 187)
    q, positions, kv, gates = random_cache(lengths, tokens, 1, 16, 128, 128, geometry, shared,
                                           max(lengths) + tokens + 3, dtype=dtype)
    nsa_decode(q, positions, kv, gates, geometry, scoring)


WORKLOADS = {
    "paper-bf16": lambda: module_step(torch.bfloat16, 16, 1, 128, PAPER),
    "small-groups-max-logit-shared-bf16": lambda: module_step(
        torch.bfloat16, 8, 2, 64, SMALL, selection_scoring="max_logit", kv_sharing="shared"),
    "key-bound-fp32": lambda: module_step(torch.float32, 4, 2, 32, SMALL, selection_scoring="key_bound"),
    "branch-ops-bf16": lambda: branch_ops(torch.bfloat16),
    "decode-bf16": lambda: decode(torch.bfloat16, shared=False, scoring="compressed"),
    "decode-speculative-shared-bf16": lambda: decode(torch.bfloat16, shared=True, scoring="compressed", tokens=2),
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Per workload, the compile record of each of its launches."""
    torch.manual_seed(0)
    launches = {}
    for name, workload in WORKLOADS.items():
        with recorded_launches() as launches[name]:
            workload()
    records = iter(compile_for_gpu([launch for runs in launches.values() for launch in runs],
                                   str(tmp_path_factory.mktemp("sm90"))))
    compiled = {name: [next(records) for _ in runs] for name, runs in launches.items()}
    if os.environ.get(REPORT_VARIABLE):
        Path(os.environ[REPORT_VARIABLE]).write_text(json.dumps(compiled, indent=1))
    return compiled


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_kernels_compile_for_sm90(compiled, workload):
    records = compiled[workload]
    assert records, f"{workload} launched no Triton kernel"
    errors = [f"{r['module']}.{r['name']} (triton {r['triton']}):\n{r['error']}" for r in records if r["error"]]
    assert not errors, "\n\n".join(errors)
    too_big = [(r["name"], r["shared"]) for r in records if r["shared"] > SM90_SHARED_MEMORY]
    assert not too_big, f"more shared memory than an sm_90 block may use ({SM90_SHARED_MEMORY} B): {too_big}"


def test_every_kernel_is_compiled(compiled):
    import nsa_kernels.triton as package

    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        kernels |= {(module.__name__, name) for name, obj in vars(module).items()
                    if name.endswith("_kernel") and getattr(getattr(obj, "fn", None), "__module__", None)
                    == module.__name__}  # a jitted (or interpreted) function defined in that module
    done = {(r["module"], r["name"]) for records in compiled.values() for r in records}
    assert kernels and not kernels - done, f"kernels no workload launched: {sorted(kernels - done)}"
