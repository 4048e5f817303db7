"""The synthetic retrieval generator and the byte-level text dataset."""
import pytest
import torch

from nsa_dist.data import IGNORE_INDEX, ByteTextDataset, RetrievalTask


@pytest.mark.parametrize("seq_len", [40, 257, 1000])
def test_retrieval_answers_match_the_pairs_in_context(seed, seq_len):
    task = RetrievalTask(num_pairs=8, num_keys=20, num_values=7, num_filler=5)
    batch = task.sample(4, seq_len, torch.Generator().manual_seed(seed))
    assert batch.tokens.shape == batch.targets.shape == (4, seq_len)
    assert int(batch.tokens.max()) < task.vocab_size
    key_lo, value_lo = task.num_filler, task.num_filler + task.num_keys
    for tokens, targets in zip(batch.tokens.tolist(), batch.targets.tolist()):
        context = seq_len - 3 * task.num_pairs
        pairs = {tokens[i]: tokens[i + 1] for i in range(context - 1) if key_lo <= tokens[i] < value_lo}
        assert len(pairs) == task.num_pairs, f"seed {seed}: keys must be distinct and all present"
        assert all(value_lo <= v < task.query_token for v in pairs.values())
        labelled = [i for i, t in enumerate(targets) if t != IGNORE_INDEX]
        assert len(labelled) == task.num_pairs
        for i in labelled:
            assert tokens[i - 1] == task.query_token and targets[i] == pairs[tokens[i]] == tokens[i + 1]


@pytest.mark.parametrize("seq_len", [40, 257, 1000])
def test_fused_needles_decode_to_the_queried_answers(seed, seq_len):
    """fused=True: the context holds one needle token per pair (key * num_values + value past the value tokens);
    every query's answer is the value its key's needle encodes."""
    task = RetrievalTask(num_pairs=8, num_keys=20, num_values=7, num_filler=5, fused=True)
    assert task.vocab_size == 5 + 20 + 7 + 20 * 7 + 1
    batch = task.sample(3, seq_len, torch.Generator().manual_seed(seed))
    fused_lo, value_lo = task.num_filler + task.num_keys + task.num_values, task.num_filler + task.num_keys
    context = seq_len - 3 * task.num_pairs
    for tokens, targets in zip(batch.tokens.tolist(), batch.targets.tolist()):
        needles = [t - fused_lo for t in tokens[:context] if fused_lo <= t < task.query_token]
        assert len(needles) == task.num_pairs and all(t < task.num_filler for t in tokens[:context]
                                                       if not fused_lo <= t < task.query_token)
        answer = {task.num_filler + n // 7: value_lo + n % 7 for n in needles}
        assert len(answer) == task.num_pairs, f"seed {seed}: keys must be distinct"
        labelled = [i for i, t in enumerate(targets) if t != IGNORE_INDEX]
        assert len(labelled) == task.num_pairs
        for i in labelled:
            assert tokens[i - 1] == task.query_token and targets[i] == answer[tokens[i]] == tokens[i + 1]


def test_retrieval_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_pairs=9 exceeds num_keys=8"):
        RetrievalTask(num_pairs=9, num_keys=8)
    with pytest.raises(ValueError, match="seq_len=30 is too short for num_pairs=8: need at least 40"):
        RetrievalTask(num_pairs=8).sample(1, 30, torch.Generator())


def test_byte_text_windows(tmp_path, seed):
    text = bytes(range(256)) * 3
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    batch = ByteTextDataset(path).sample(5, 100, torch.Generator().manual_seed(seed))
    assert batch.tokens.shape == (5, 100)
    for tokens, targets in zip(batch.tokens.tolist(), batch.targets.tolist()):
        assert tokens[1:] == targets[:-1]
        assert targets[-1] == (tokens[-1] + 1) % 256  # the file counts up byte by byte
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ByteTextDataset(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        ByteTextDataset(path).sample(1, 5000, torch.Generator())


def test_byte_text_split_holds_out_the_tail(tmp_path, seed):
    """train and valid windows come from disjoint parts of the file: the first 80% and the last 20%."""
    data = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    path = tmp_path / "corpus.bin"
    path.write_bytes(bytes(data.tolist()))
    train = ByteTextDataset(path, "train", 0.2)
    valid = ByteTextDataset(path, "valid", 0.2)
    assert torch.equal(torch.cat([train.data, valid.data]), data) and len(valid.data) == 1000
    gen = torch.Generator().manual_seed(seed)
    for dataset, part in ((train, data[:4000].tolist()), (valid, data[4000:].tolist())):
        batch = dataset.sample(4, 64, gen)
        text = bytes(part)
        for tokens, targets in zip(batch.tokens.tolist(), batch.targets.tolist()):
            assert bytes(tokens + targets[-1:]) in text
    with pytest.raises(ValueError, match=r"split='valid' needs 0 < valid_fraction < 1, got 0.0"):
        ByteTextDataset(path, "valid")
    with pytest.raises(ValueError, match=r"split='test' is not one of"):
        ByteTextDataset(path, "test", 0.2)
    with pytest.raises(ValueError, match=r"\(valid split\) has 1000 bytes, fewer than seq_len \+ 1 = 1001"):
        valid.sample(1, 1000, gen)
