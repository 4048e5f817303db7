"""Retrieval diagnostics against brute force: the retrieval task's needle positions, the probe's selection recall,
compressed mass on the needle and gates (float64 loops of tests/helpers/oracle.py), accuracy by needle depth, and the
trainer's evaluation records."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import oracle as O

from nsa_dist import GPT, GPTConfig, NSAConfig
from nsa_dist.data import IGNORE_INDEX, Needles, RetrievalTask
from nsa_dist.diagnostics import BRANCH_NAMES, NeedleProbe, observe_branches, retrieval_diagnostics
from nsa_dist.train import train
from nsa_dist.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

GEO = dict(block_len=8, stride=4, select_len=16, top_n=3, init_blocks=1, local_blocks=1, window=8)


@pytest.mark.parametrize("fused", [True, False])
def test_needles_point_at_answers_and_their_needles(fused, seed):
    task = RetrievalTask(num_pairs=5, num_keys=7, num_values=6, num_filler=9, fused=fused)
    gen = torch.Generator().manual_seed(seed)
    batch = task.sample(3, 61, gen)
    rows, needles = batch.needles
    assert rows.shape == needles.shape == (3, 5)
    value_base = task.num_filler + task.num_keys
    for b in range(3):
        for p in range(5):
            t, n = int(rows[b, p]), int(needles[b, p])
            key, value = int(batch.tokens[b, t]), int(batch.targets[b, t])
            assert value != IGNORE_INDEX and n < t, f"seed={seed}"
            if fused:
                expected = value_base + task.num_values + (key - task.num_filler) * task.num_values + \
                    (value - value_base)
                assert int(batch.tokens[b, n]) == expected, f"seed={seed}"
            else:
                assert (int(batch.tokens[b, n - 1]), int(batch.tokens[b, n])) == (key, value), f"seed={seed}"
        assert sorted(rows[b].tolist()) == (batch.targets[b] != IGNORE_INDEX).nonzero().flatten().tolist()
    again = task.sample(3, 61, torch.Generator().manual_seed(seed))
    assert torch.equal(again.tokens, batch.tokens) and torch.equal(again.needles.needle_rows, needles)


def _oracle_stats(q, k_cmp, k_slc, gates, rows, needles, config: NSAConfig):
    """Per KV head: recall, compressed mass on the needle's blocks, full attention's mass on the needle's
    selection block, gates; float64 loops over the oracle."""
    B, T, HQ, _ = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    geo = dict(block_len=config.block_len, stride=config.stride, select_len=config.select_len)
    idx = O.oracle_select_blocks(q, k_cmp, top_n=config.top_n, init_blocks=config.init_blocks,
                                 local_blocks=config.local_blocks, scale=config.softmax_scale, **geo)
    scale = config.softmax_scale or q.shape[-1] ** -0.5
    exact_idx = O.oracle_max_logit_blocks(q, k_slc, config.select_len, config.top_n, config.init_blocks,
                                          config.local_blocks, scale)
    recall, exact_recall, mass, key_mass = (torch.zeros(H, dtype=torch.float64) for _ in range(4))
    gate = torch.zeros(H, 3, dtype=torch.float64)
    count = 0
    for b in range(B):
        for t, n in zip(rows[b].tolist(), needles[b].tolist()):
            count += 1
            visible = [i for i in range(k_cmp.shape[1]) if i * config.stride + config.block_len - 1 <= t]
            for h in range(H):
                recall[h] += float((n // config.select_len) in idx[b, t, h].tolist())
                exact_recall[h] += float((n // config.select_len) in exact_idx[b, t, h].tolist())
                for hq in range(h * G, (h + 1) * G):
                    probs = O._compressed_probs(q[b, t, hq].double(), k_cmp[b, :, h].double(), visible, scale)
                    on_needle = [p for i, p in zip(visible, probs)
                                 if i * config.stride <= n < i * config.stride + config.block_len]
                    mass[h] += math.fsum(on_needle) / G
                    logits = [float(q[b, t, hq].double() @ k_slc[b, j, h].double()) * scale for j in range(t + 1)]
                    top = max(logits)
                    weights = [math.exp(x - top) for x in logits]
                    block = range(n // config.select_len * config.select_len, t + 1)
                    key_mass[h] += math.fsum(weights[j] for j in block if j // config.select_len ==
                                             n // config.select_len) / math.fsum(weights) / G
                    gate[h] += gates[b, t, hq].double() / G
    return recall / count, exact_recall / count, mass / count, key_mass / count, gate / count


@pytest.mark.parametrize("HQ,H", [(4, 2), (3, 3), (6, 1)])
def test_probe_matches_brute_force(HQ, H, seed):
    config = NSAConfig(hidden_size=8, num_heads=HQ, num_kv_heads=H, head_dim=8, **GEO)
    B, T, D = 2, 77, 8  # T not a multiple of the blocks; answers where top-n must choose (t // 16 + 1 > 3)
    nc = (T - config.block_len) // config.stride + 1
    q, k_cmp, v_cmp = torch.randn(B, T, HQ, D) * 2, torch.randn(B, nc, H, D), torch.randn(B, nc, H, D)
    k_slc = torch.randn(B, T, H, D) * 2
    gates = torch.rand(B, T, HQ, 3)
    rows = torch.stack([torch.randperm(T - 48)[:4] + 48 for _ in range(B)])
    needles = torch.stack([torch.randint(0, int(r), ()) for r in rows.flatten()]).view(B, 4)
    probe = NeedleProbe()
    for _ in range(2):  # two forwards of one layer accumulate into one layer
        with probe.watching(Needles(rows, needles)):
            observe_branches(config, q, k_cmp, v_cmp, k_slc, gates, None)
    (layer,) = probe.summary()
    recall, exact_recall, mass, key_mass, gate = _oracle_stats(q, k_cmp, k_slc, gates, rows, needles, config)
    msg = f"HQ={HQ} H={H} seed={seed}"
    torch.testing.assert_close(torch.tensor(layer["selection_recall"], dtype=torch.float64), recall, msg=msg)
    torch.testing.assert_close(torch.tensor(layer["max_logit_recall"], dtype=torch.float64), exact_recall, msg=msg)
    torch.testing.assert_close(torch.tensor(layer["compressed_mass"], dtype=torch.float64), mass, rtol=1e-5,
                               atol=1e-6, msg=msg)
    torch.testing.assert_close(torch.tensor(layer["selection_key_mass"], dtype=torch.float64), key_mass, rtol=1e-6,
                               atol=1e-9, msg=msg)
    for i, name in enumerate(BRANCH_NAMES):
        torch.testing.assert_close(torch.tensor(layer["gates"][name], dtype=torch.float64), gate[:, i], msg=msg)
    # the case is not degenerate
    assert 0 < mass.sum() and 0 < recall.sum() and 0 < key_mass.sum() and 0 < exact_recall.sum(), msg


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_accuracy_by_depth_and_layers(attention, seed):
    task = RetrievalTask(num_pairs=4, num_keys=8, num_values=8, num_filler=16, fused=True)
    model = GPT(GPTConfig(vocab_size=task.vocab_size, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                          attention=attention, nsa={k: v for k, v in GEO.items()}))
    gen = torch.Generator().manual_seed(seed)
    batches = [task.sample(2, 64, gen) for _ in range(3)]
    out = retrieval_diagnostics(model, batches, torch.device("cpu"), depth_bins=4)
    assert model.training, "the model's mode is restored"
    correct, total = [0.0] * 4, [0] * 4
    with torch.no_grad():
        model.eval()
        for batch in batches:
            pred = model(batch.tokens).argmax(-1)
            for b in range(2):
                for t, n in zip(*(x[b].tolist() for x in batch.needles)):
                    total[n * 4 // 64] += 1
                    correct[n * 4 // 64] += float(pred[b, t] == batch.targets[b, t])
        model.train()
    assert out["answers_by_depth"] == [float(n) for n in total]
    assert out["accuracy_by_depth"] == [None if n == 0 else c / n for c, n in zip(correct, total)]
    assert len(out["layers"]) == (2 if attention == "nsa" else 0)
    for layer in out["layers"]:
        assert len(layer["selection_recall"]) == 2 and all(0 <= r <= 1 for r in layer["selection_recall"])


def test_trainer_records_diagnostics_at_every_evaluation(tmp_path):
    raw = TrainConfig.load("configs/train/tiny-cpu.yaml").to_dict()
    raw["train"].update(cp=1, steps=2, eval_every=1, eval_batches=1, batch_size=2, log_every=1)
    raw["data"]["seq_len"] = 128
    raw["out_dir"] = str(tmp_path)
    metrics = train(TrainConfig.from_dict(raw), progress=False, save_checkpoint=False)
    assert [e["step"] for e in metrics["evals"]] == [0, 1, 2]
    for e in metrics["evals"]:
        layers = e["diagnostics"]["layers"]
        assert len(layers) == raw["model"]["num_layers"]
        assert set(layers[0]["gates"]) == set(BRANCH_NAMES)
    assert "diagnostics" in metrics["final_eval"]
