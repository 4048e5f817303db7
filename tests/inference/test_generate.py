"""``GPT.generate``: greedy decoding equals an argmax loop over full forwards, batched prompts of different lengths
give what each gives alone, seeded sampling is reproducible, stop tokens and max_length end rows."""
import pytest
import torch

from .cases import tiny_gpt


def slow_greedy(model, prompt, max_new_tokens, stop_tokens=()):
    """The independent reference: re-run the full forward on the growing sequence and append its argmax."""
    seq = prompt[None]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(seq)[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            if int(nxt) in stop_tokens:
                break
    return seq[0]


def right_padded(prompts, pad=7):
    """``tokens [B, max length]`` (padded with ``pad``) and ``lengths [B]`` of a list of 1-d prompts."""
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.full((len(prompts), int(lengths.max())), pad)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    return tokens, lengths


def prompts(seed, sizes=(3, 17, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (n,), generator=g) for n in sizes]


@pytest.mark.parametrize("attention,nsa", [
    ("nsa", {}), ("nsa", dict(kv_sharing="shared", selection_scoring="key_bound")), ("dense", {}),
])
def test_greedy_equals_argmax_of_full_forward(attention, nsa):
    model = tiny_gpt(attention, seed=11, **nsa)
    batch = prompts(12)
    tokens, lengths = right_padded(batch)
    out = model.generate(tokens, 30, lengths=lengths)
    for row, prompt in enumerate(batch):
        expected = slow_greedy(model, prompt, 30)
        assert out.lengths[row] == len(expected)
        assert torch.equal(out.tokens[row, :len(expected)], expected), f"row {row}"
        assert (out.tokens[row, len(expected):] == 0).all()


def test_batched_equals_alone_and_stop_tokens():
    model = tiny_gpt("nsa", seed=13, selection_scoring="max_logit")
    batch = prompts(14, sizes=(5, 26))
    alone = [model.generate(p[None], 20).tokens[0] for p in batch]
    stop = int(alone[1][26 + 4])  # the fifth new token of the second prompt ends its row
    tokens, lengths = right_padded(batch)
    out = model.generate(tokens, 20, lengths=lengths, stop_tokens=[stop], pad_token_id=49)
    for row, (prompt, expected) in enumerate(zip(batch, alone)):
        new = expected[len(prompt):]
        hits = (new == stop).nonzero()
        end = len(prompt) + (int(hits[0]) + 1 if len(hits) else len(new))
        assert out.lengths[row] == end
        assert torch.equal(out.tokens[row, :end], expected[:end]), f"row {row}"
        assert (out.tokens[row, end:] == 49).all()
    assert out.lengths[1] <= 26 + 5


def test_max_length_caps_each_row():
    model = tiny_gpt("nsa", seed=15)
    tokens, lengths = right_padded(prompts(16, sizes=(4, 12)))
    out = model.generate(tokens, 20, lengths=lengths, max_length=15)
    assert out.lengths.tolist() == [15, 15]
    assert out.tokens.shape == (2, 15)
    assert torch.equal(out.tokens[1, :15], slow_greedy(model, tokens[1, :12], 3))


def test_seeded_sampling_is_reproducible():
    model = tiny_gpt("nsa", seed=17)
    tokens, lengths = right_padded(prompts(18))

    def sample(seed, **options):
        return model.generate(tokens, 25, lengths=lengths, temperature=1.3,
                              generator=torch.Generator().manual_seed(seed), **options).tokens

    first = sample(0, top_k=10)
    assert torch.equal(first, sample(0, top_k=10))
    assert not torch.equal(first, sample(1, top_k=10))
    assert torch.equal(sample(2, top_k=1), model.generate(tokens, 25, lengths=lengths).tokens)


def test_generate_selects_top_n_even_with_the_warm_up_flag_on():
    model = tiny_gpt("nsa", seed=19)
    prompt = prompts(20, sizes=(30,))[0]
    for block in model.blocks:
        block.attn.full_selection = True
    out = model.generate(prompt[None], 5)
    assert not any(block.attn.full_selection for block in model.blocks)
    assert torch.equal(out.tokens[0], slow_greedy(model, prompt, 5))
