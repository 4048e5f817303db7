"""Full-selection warm-up: the switched layer equals NSA with every block selected (both backends, packed
documents, several GQA ratios), the trainers switch it for the configured steps only and evaluate with top-n;
training configs under context parallelism take it (its CP path: tests/parallel) but refuse the selection loss by
name."""
import math

import pytest
import torch

import nsa_kernels
from nsa_dist import NativeSparseAttention, NSAConfig
from nsa_dist import train as train_module
from nsa_dist.models import GPT, GPTConfig
from nsa_dist.selection_warmup import set_full_selection
from nsa_dist.training import TrainConfig

GEO = dict(block_len=8, stride=4, select_len=8, top_n=2, init_blocks=1, local_blocks=1, window=8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("HQ,H", [(4, 2), (3, 3), (6, 1)])
def test_full_selection_equals_top_n_over_every_block(backend, HQ, H, seed):
    T = 45  # not a multiple of the blocks; two packed documents of 6 and 4 selection blocks
    cu = torch.tensor([0, 19, T], dtype=torch.int32)
    sparse = NativeSparseAttention(NSAConfig(hidden_size=12, num_heads=HQ, num_kv_heads=H, head_dim=4, **GEO))
    every = dict(GEO, top_n=math.ceil(T / GEO["select_len"]))
    dense_selection = NativeSparseAttention(NSAConfig(hidden_size=12, num_heads=HQ, num_kv_heads=H, head_dim=4,
                                                      **every))
    dense_selection.load_state_dict(sparse.state_dict())
    sparse.full_selection = True
    x = torch.randn(1, T, 12)
    with nsa_kernels.use_backend(backend):
        y, y_ref = sparse(x, cu_seqlens=cu), dense_selection(x, cu_seqlens=cu)
        y.square().sum().backward()
        y_ref.square().sum().backward()
    msg = f"backend={backend} HQ={HQ} H={H} seed={seed}"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6, msg=msg)
    for (name, p), p_ref in zip(sparse.named_parameters(), dense_selection.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {msg}")
    sparse.full_selection = False
    with nsa_kernels.use_backend(backend):
        assert not torch.allclose(sparse(x, cu_seqlens=cu), y_ref, atol=1e-4), f"top-n must differ: {msg}"


def test_set_full_selection_switches_every_nsa_layer():
    model = GPT(GPTConfig(vocab_size=11, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2, nsa=GEO))
    assert set_full_selection(model, True) == 3
    assert all(block.attn.full_selection for block in model.blocks)
    assert set_full_selection(model, False) == 3 and not any(block.attn.full_selection for block in model.blocks)
    dense = GPT(GPTConfig(vocab_size=11, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                          attention="dense"))
    assert set_full_selection(dense, True) == 0


def _tiny_config(tmp_path, warmup_steps: int, **train) -> TrainConfig:
    raw = TrainConfig.load("configs/train/tiny-cpu.yaml").to_dict()
    raw["train"].update({"cp": 1, "steps": 5, "eval_every": 2, "eval_batches": 1, "batch_size": 2, "log_every": 1,
                         **train})
    raw["data"]["seq_len"] = 128  # 4 zigzag chunks of l' = 32 under cp=2
    raw["model"]["nsa"]["selection_warmup_steps"] = warmup_steps
    raw["out_dir"] = str(tmp_path)
    return TrainConfig.from_dict(raw)


def test_trainer_warms_up_for_the_configured_steps_and_evaluates_with_top_n(tmp_path, monkeypatch):
    seen = []  # (full_selection of the first layer, training mode) at every NSA forward
    original = NativeSparseAttention.forward

    def spy(self, *args, **kwargs):
        if self is first_layer[0]:
            seen.append((self.full_selection, self.training))
        return original(self, *args, **kwargs)

    first_layer = []
    original_init = GPT.__init__

    def init_spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        first_layer.append(self.blocks[0].attn)

    monkeypatch.setattr(NativeSparseAttention, "forward", spy)
    monkeypatch.setattr(GPT, "__init__", init_spy)
    train_module.train(_tiny_config(tmp_path, 3), progress=False, save_checkpoint=False)
    training = [full for full, mode in seen if mode]
    assert training == [True, True, True, False, False]
    evaluation = [full for full, mode in seen if not mode]
    assert evaluation and not any(evaluation), "evaluation runs top-n"


def test_context_parallel_takes_the_warmup_but_refuses_the_selection_loss_by_name(tmp_path):
    assert _tiny_config(tmp_path, 4, cp=2).train.cp == 2  # the CP path is checked in tests/parallel
    raw = _tiny_config(tmp_path, 4, cp=2).to_dict()
    raw["model"]["nsa"].update(selection_loss_weight=0.5, selection_scoring="compressed")
    with pytest.raises(ValueError, match=r"model\.nsa\.selection_loss_weight=0\.5 .*train\.cp=2.*set it to 0"):
        TrainConfig.from_dict(raw)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_warmup_steps_are_refused(bad):
    with pytest.raises(ValueError, match="selection_warmup_steps"):
        NSAConfig(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, selection_warmup_steps=bad)
