"""The chunked LM-head loss (``train.loss_chunk_tokens``): loss, accuracy and gradients equal the full-logits loss
for lengths that are not a multiple of the chunk and with ignored targets, no LM-head output holds more rows than a
chunk, and a short training run with it on equals one with it off."""
import pytest
import torch
from torch import nn

from nsa_dist import GPT, GPTConfig
from nsa_dist.data import IGNORE_INDEX, Batch
from nsa_dist.train import train
from nsa_dist.training import ContextParallelGroup, TrainConfig
from nsa_dist.training import loss as loss_module
from nsa_dist.training.loss import chunked_head_loss, loss_and_accuracy, summed_loss_and_correct


def _targets(shape, vocab: int, gen: torch.Generator, hits: torch.Tensor) -> torch.Tensor:
    """Random targets, about a third of them ``hits`` (the predictions: a non-zero accuracy) and a third ignored."""
    draw = torch.rand(shape, generator=gen)
    targets = torch.randint(0, vocab, shape, generator=gen).where(draw > 0.3, hits)
    return targets.masked_fill(draw > 0.7, IGNORE_INDEX)


@pytest.mark.parametrize("chunk", [1, 16, 73, 500])
def test_chunked_head_loss_and_gradients_equal_full_logits_float64(chunk):
    """74 rows (2 x 37) in chunks of 1, 16 (a short last chunk), 73 and 500 (one chunk): the summed loss and the
    gradients w.r.t. the hidden states and the head's weight agree to 1e-12, the correct count exactly."""
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(16, 50, bias=False).double()
    hidden = torch.randn(2, 37, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = _targets((2, 37), 50, gen, head(hidden).argmax(-1))
    results = []
    for chunked in (False, True):
        head.zero_grad()
        hidden.grad = None
        if chunked:
            loss, correct = chunked_head_loss(head, hidden, targets, chunk)
        else:
            loss, correct = summed_loss_and_correct(head(hidden), targets)
        loss.backward()
        results.append((loss.detach(), correct, hidden.grad.clone(), head.weight.grad.clone()))
    (loss, correct, grad_h, grad_w), (c_loss, c_correct, c_grad_h, c_grad_w) = results
    assert loss.dtype == torch.float64 and int(correct) == int(c_correct) > 0
    torch.testing.assert_close(c_loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(c_grad_h, grad_h, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(c_grad_w, grad_w, rtol=1e-12, atol=1e-15)


def test_gpt_step_with_chunked_loss_equals_full_logits():
    """One GPT training step (float32, tied embeddings): loss, accuracy, every parameter's gradient and the
    parameters after an AdamW step equal the full-logits step's; the head never sees more than 48 rows."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, attention="dense")
    models = [GPT(config), GPT(config)]
    models[1].load_state_dict(models[0].state_dict())
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 61), generator=gen)
    with torch.no_grad():
        batch = Batch(tokens, _targets((2, 61), 97, gen, models[0](tokens).argmax(-1)))
    rows = []
    models[1].lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    results = []
    for model, chunk in zip(models, (0, 48)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss, acc = loss_and_accuracy(model, batch, ContextParallelGroup(), loss_chunk_tokens=chunk)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        results.append((loss.detach(), acc, grads, dict(model.named_parameters())))
    (loss, acc, grads, params), (c_loss, c_acc, c_grads, c_params) = results
    assert rows and max(rows) == 48 and sum(rows) == 2 * 2 * 61  # forward and the backward's recompute, chunked
    assert acc.item() == c_acc.item() > 0
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(c_params[name], params[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # trains two short runs
def test_training_run_with_chunked_loss_equals_full_logits(tmp_path, monkeypatch):
    """tiny-cpu on one process, 3 steps of 2 x 256 tokens: train.loss_chunk_tokens 100 (6 chunks, the last one
    short) logs the losses of train.loss_chunk_tokens 0 to float32 rounding and the same accuracies."""
    calls = []
    chunked = loss_module.chunked_head_loss
    monkeypatch.setattr(loss_module, "chunked_head_loss", lambda *a: calls.append(a[-1]) or chunked(*a))
    runs = []
    for chunk in (0, 100):
        raw = TrainConfig.load("configs/train/tiny-cpu.yaml").to_dict()
        raw["train"].update(cp=1, steps=3, batch_size=2, eval_batches=1, log_every=1, loss_chunk_tokens=chunk)
        raw["out_dir"] = str(tmp_path / f"chunk{chunk}")
        runs.append(train(TrainConfig.from_dict(raw), progress=False, save_checkpoint=False))
    assert calls and set(calls) == {100}  # the chunked run took the chunked loss (training and evaluation)
    full, chunked_run = runs
    for a, b in zip(full["history"], chunked_run["history"], strict=True):
        assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    for key in ("initial_eval", "final_eval"):
        assert full[key]["accuracy"] == chunked_run[key]["accuracy"]
        assert full[key]["loss"] == pytest.approx(chunked_run[key]["loss"], rel=1e-5), key
