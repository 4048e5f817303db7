"""benchmarks/context_parallel.py: its packed documents fit every layout, and the benchmark runs end to end on two
gloo CPU ranks (``--device cpu``) for the whole-sequence and the per-document layouts, writing every case."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.context_parallel import packed_documents

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("T,documents,P", [(2048, 3, 2), (4096, 7, 4), (96, 12, 4)])
def test_packed_documents_fit_the_per_document_layout(T, documents, P):
    cu = packed_documents(T, documents, P, "cpu")
    lengths = cu.diff()
    assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == T and len(lengths) == documents
    assert bool((lengths % (2 * P) == 0).all()) and bool((lengths > 0).all())
    assert int(lengths[-1]) > int(lengths[0]) or documents * 2 * P == T  # unequal unless there is no room


def test_packed_documents_one_document_and_errors():
    assert packed_documents(1024, 1, 2, "cpu") is None
    with pytest.raises(ValueError, match="--documents 9 needs T=32"):
        packed_documents(32, 9, 2, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["per_document", "zigzag"])
def test_benchmark_runs_on_cpu_ranks(tmp_path, layout):
    out = tmp_path / "cp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "benchmarks/context_parallel.py",
           "--device", "cpu", "--seqlens", "1024", "--documents", "3", "--layout", layout, "--heads", "4",
           "--kv-heads", "2", "--dim", "16", "--iters", "1", "--patterns", "local", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "single GPU" and "CP=2 sparse" in methods and "CP=2 allgather" in methods
    assert any(m.startswith("dense CP=2") for m in methods)
    for r in rows:
        assert (r["layout"], r["documents"], r["T"]) == (layout, 3, 1024) and r["fwd+bwd ms"] > 0
    assert all(r["sent_bytes"] > 0 for r in rows if "CP=2" in r["method"])
    assert f"| 1k | 3 | {layout} | local | CP=2 sparse |" in proc.stdout
