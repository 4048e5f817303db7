"""examples/megatron/pretrain_gpt_nsa.py, launched with torchrun on 2 gloo CPU ranks (``--cpu``): a tiny NSA GPT
(with the retrieval recipe: key-bound scoring, 3 full-selection iterations) on megatron's mock data must train
under context parallelism (CP=2) and under tensor parallelism (TP=2), and the two runs, the same model on the same
batches split differently, must log the same losses; it also trains on a
byte-level indexed dataset written by examples/megatron/make_byte_dataset.py."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

pytestmark = pytest.mark.slow  # megatron-core models on spawned gloo ranks

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "megatron"
SCRIPT = EXAMPLES / "pretrain_gpt_nsa.py"
ITERS = 8
TINY = ["--cpu", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "256", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--log-interval", "1"]
# vocab 256 pads to 256 under TP=1 and TP=2 alike, so both runs build the same model (CPU init is TP-invariant)
MOCK = [*TINY, "--vocab-size", "256", "--train-iters", str(ITERS), "--min-lr", "1e-3",
        "--nsa-recipe", "retrieval", "--nsa-selection-warmup-steps", "3"]  # the retrieval recipe (one switch)
PARALLEL = {"cp2": ["--context-parallel-size", "2"], "tp2": ["--tensor-model-parallel-size", "2"]}


def run_example(out_dir: Path, args: list) -> list:
    """Run the example with these arguments on 2 local ranks and return its JSON log records."""
    log = out_dir / "log.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           *args, "--json-log", str(log)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {name: run_example(tmp_path_factory.mktemp(name), [*MOCK, *args]) for name, args in PARALLEL.items()}


@pytest.mark.parametrize("name", sorted(PARALLEL))
def test_example_trains(runs, name):
    records = runs[name]
    losses = [r["loss"] for r in records]
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1)), records
    assert all(math.isfinite(x) for x in losses), losses
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_memory_mib"] > 0 for r in records), records
    # starts near ln(256) = 5.55; the mock documents count up (next token = token + 1), learnable in 8 steps
    assert losses[-1] < losses[0] - 0.5, f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_context_and_tensor_parallel_runs_agree(runs):
    cp, tp = ([r["loss"] for r in runs[name]] for name in ("cp2", "tp2"))
    assert all(abs(a - b) <= 2e-3 for a, b in zip(cp, tp)), f"CP=2 {cp}\nTP=2 {tp}"


def load_example(path: Path = SCRIPT):
    """An example script as a module (nothing runs: both scripts start only under ``__main__``)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def byte_dataset(tmp_path):
    """A Megatron indexed dataset of two text files, one document per line (make_byte_dataset.py)."""
    texts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    texts[0].write_text("native sparse attention\n\ncompresses, selects and slides\n")
    texts[1].write_text("the quick brown fox jumps over the lazy dog. " * 300 + "\n")
    prefix = str(tmp_path / "data" / "bytes")
    assert load_example(EXAMPLES / "make_byte_dataset.py").write_byte_dataset(texts, prefix, split_lines=True) \
        == (3, 13556)  # 23, 30 and 13500 bytes, each + end of document
    return prefix


def test_byte_dataset_reads_back_as_bytes_and_eod(byte_dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    data = IndexedDataset(byte_dataset)
    assert len(data) == 3
    assert data[0].tolist() == list(b"native sparse attention") + [256]
    assert data[1].tolist() == list(b"compresses, selects and slides") + [256]


def test_example_trains_on_byte_dataset(tmp_path, byte_dataset):
    # the later --lr wins: 1e-2 makes Adam spike on bytes within 4 steps, 3e-3 descends
    records = run_example(tmp_path, [*TINY, "--lr", "3e-3", "--vocab-size", "257", "--train-iters", "4",
                                     "--context-parallel-size", "2", "--data-path", byte_dataset])
    losses = [r["loss"] for r in records]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4] and all(math.isfinite(x) for x in losses), records
    # starts near ln(384) = 5.95 (vocab padded); the repeated sentence's bytes are quickly learnable
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("argv, world_size, message", [
    (["--context-parallel-size", "2", "--seq-length", "192"], 2, r"--seq-length 192 is not divisible by 2 \* CP \* "
                                                                   r"nsa select len = 2 \* 2 \* 64"),
    (["--attention", "dense", "--context-parallel-size", "2"], 2,
     "--attention dense refuses --context-parallel-size 2"),
    (["--tensor-model-parallel-size", "2"], 3, r"world size 3 is not divisible by TP\*PP\*CP = 2\*1\*1"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6 is not divisible"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs TP > 1"),
], ids=["cp-chunk-not-whole-blocks", "dense-with-cp", "world-size", "global-batch", "sp-without-tp"])
def test_bad_sizes_are_refused(argv, world_size, message):
    example = load_example()
    with pytest.raises(ValueError, match=message):
        example.check_args(example.parse_args(argv), world_size)
