"""benchmarks/loss_memory.py: the counted peak memory of the LM-head loss behaves as the tensors it must hold say:
the full loss holds the logits and their gradient at once, the chunked loss one chunk's share of that (beside the
inputs' gradients), never below one chunk's logits; and the table and JSON carry every row."""
import json

import pytest
import torch

from benchmarks.loss_memory import counted_peak_gib, main

GIB = 2 ** 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counted_peaks_bound_the_logits(dtype):
    T, hidden, vocab = 1000, 48, 3001  # not multiples of the chunk sizes
    logits = T * vocab * torch.finfo(dtype).bits // 8 / GIB
    full = counted_peak_gib(T, hidden, vocab, dtype, 0)
    chunked = [counted_peak_gib(T, hidden, vocab, dtype, chunk) for chunk in (500, 250, 100)]
    assert full >= 2 * logits  # the logits and their gradient are alive together in the backward
    assert full > chunked[0] > chunked[1] > chunked[2]
    grads = (T + vocab) * hidden * torch.finfo(dtype).bits // 8 / GIB  # of the hidden states and the head weight
    for chunk, peak in zip((500, 250, 100), chunked):
        assert peak >= 2 * logits * chunk / T  # one chunk's logits and their gradient
        # one chunk's share of what the full loss holds at its peak, beside the inputs' gradients: no chunk's
        # logits outlive it (the forward keeps none, the backward recomputes them)
        assert peak <= (full * chunk / T + grads) * 1.01, (chunk, peak, full)


def test_table_and_json(tmp_path, capsys):
    out = tmp_path / "loss.json"
    main(["--tokens", "256", "--hidden", "16", "--vocab", "500", "--chunks", "0", "64", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| full logits |" in text and "| chunked, 64 tokens |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["chunk_tokens"] for r in rows] == [0, 64] and rows[0]["counted_gib"] > rows[1]["counted_gib"] > 0


def test_measure_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="--measure needs a CUDA GPU"):
        main(["--measure"])
