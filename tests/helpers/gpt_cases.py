"""Tiny megatron-core GPTs with the NSA layer spec, run on spawned gloo CPU ranks (imported by the tests' ranks).

megatron-core hard-codes CUDA in five places these tests reach: ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to
``torch.cuda.current_device()``, ``GlobalMemoryBuffer.get_tensor`` (sequence-parallel all-gather) allocates there,
``get_pos_emb_on_this_cp_rank`` (RoPE rows of a CP rank) builds its index in pinned memory and calls ``.cuda()``,
the sequence-parallel embedding dropout forks the CUDA RNG tracker (dropout is 0 here) and the distributed
checkpoint writer calls ``torch.cuda.synchronize()`` (nothing to wait for on the CPU). :func:`cpu_shim`
patches these inside the test ranks only; on GPUs megatron's own code runs.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from nsa_dist import BlockCompressor

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")


def cpu_shim() -> None:
    """Make megatron-core's CUDA-only calls above run on the CPU (test ranks only)."""
    from megatron.core import tensor_parallel
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    tensor_parallel.get_cuda_rng_tracker = lambda *args, **kwargs: _NoRNGFork()


class _NoRNGFork:
    """Stands in for megatron's CUDA RNG tracker: ``fork()`` keeps the CPU generator (no dropout in the tests)."""

    def fork(self, *args, **kwargs):
        return contextlib.nullcontext()


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """Megatron's zigzag selection of RoPE rows (chunks ``r`` and ``2P - 1 - r`` of ``2P``), on the CPU."""
    P, r = cp_group.size(), cp_group.rank()
    chunks = pos_emb.chunk(2 * P, dim=seq_dim)
    return torch.cat([chunks[r], chunks[2 * P - 1 - r]], dim=seq_dim)


@dataclass(frozen=True)
class GPTCase:
    """Model and batch of one test. ``docs``: packed document lengths (``thd``, batch 1) or None (``batch`` rows
    of ``seq`` tokens, ``sbhd``). The NSA geometry is scaled down so that 256 tokens exercise every branch."""

    seq: int = 256
    batch: int = 2
    docs: Optional[Tuple[int, ...]] = None
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    groups: int = 2
    vocab: int = 96
    rope: bool = True
    rotary_percent: float = 1.0
    seed: int = 0
    nsa: Dict[str, object] = field(default_factory=lambda: dict(
        nsa_block_len=8, nsa_stride=4, nsa_select_len=16, nsa_top_n=3, nsa_window=24, nsa_compressor="mlp"))


def init_parallel(tp: int = 1, cp: int = 1) -> None:
    """(Re)initialise megatron's parallel state on the already joined default gloo group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)


def build_model(case: GPTCase, tp: int = 1, cp: int = 1, sp: bool = False, dtype=torch.float64, seed=None):
    """A ``GPTModel`` with :func:`nsa_dist.megatron.get_gpt_layer_nsa_spec` on the current parallel state."""
    from megatron.core.models.gpt import GPTModel

    from nsa_dist.megatron import NSATransformerConfig, get_gpt_decoder_block_nsa_spec, get_gpt_layer_nsa_spec

    torch.manual_seed(case.seed if seed is None else seed)
    config = NSATransformerConfig(
        num_layers=case.layers, hidden_size=case.hidden, num_attention_heads=case.heads,
        num_query_groups=case.groups, ffn_hidden_size=2 * case.hidden, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=dtype, init_method_std=0.05, **case.nsa)
    # with sequence parallelism the final norm must support it too: the block spec (no TE / apex here)
    spec = get_gpt_decoder_block_nsa_spec(config) if sp else get_gpt_layer_nsa_spec()
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=case.vocab,
                     max_sequence_length=case.seq, position_embedding_type="rope" if case.rope else "learned_absolute",
                     rotary_percent=case.rotary_percent, share_embeddings_and_output_weights=False).to(dtype)
    with torch.no_grad():  # the MLP compressors start at mean pooling (zero output layer): wake every weight up
        for module in model.modules():
            if isinstance(module, BlockCompressor) and module.kind == "mlp":
                module.mlp[-1].weight.normal_(std=0.02)
    return model


def make_batch(case: GPTCase, step: int = 0) -> Dict[str, torch.Tensor]:
    """Random tokens ``[b, s]``, next-token labels, position ids (restarting at each packed document) and, when
    packed, global ``cu_seqlens``; identical on every rank (seeded)."""
    gen = torch.Generator().manual_seed(1000 * case.seed + step)
    b = 1 if case.docs else case.batch
    tokens = torch.randint(0, case.vocab, (b, case.seq + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}
    if case.docs:
        assert sum(case.docs) == case.seq
        batch["cu_seqlens"] = torch.tensor([0, *torch.tensor(case.docs).cumsum(0).tolist()], dtype=torch.int32)
        batch["position_ids"] = torch.cat([torch.arange(n) for n in case.docs])[None]
    else:
        batch["position_ids"] = torch.arange(case.seq)[None].expand(b, -1)
    return batch


def packed_seq_params_of(case: GPTCase, batch: Dict[str, torch.Tensor]):
    """megatron-core's ``thd`` ``PackedSeqParams`` of a packed batch (global offsets), or None."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if "cu_seqlens" not in batch:
        return None
    cu = batch["cu_seqlens"]
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(case.docs),
                           max_seqlen_kv=max(case.docs))


def megatron_split(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This CP rank's part of ``batch`` as megatron-core splits it, written out independently of nsa_dist: zigzag
    (``get_batch_on_this_cp_rank``), or per document with ``cu_seqlens`` (``get_thd_batch_on_this_cp_rank``)."""
    from megatron.core import parallel_state

    from tests.helpers.cp_cases import megatron_thd, megatron_zigzag

    P, r = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    if P == 1:
        return dict(batch)
    cu = batch.get("cu_seqlens")
    return {k: v if v.dim() < 2 else megatron_zigzag(v, P, r) if cu is None else megatron_thd(v, cu, P, r)
            for k, v in batch.items()}


def token_mean_loss(model, case: GPTCase, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """This rank's share of the token-mean loss (its tokens' loss sum / all tokens of the global batch), after
    splitting the batch as megatron-core does (:func:`megatron_split`), which
    :func:`nsa_dist.megatron.split_batch_for_cp_rank` must equal."""
    from nsa_dist.megatron import split_batch_for_cp_rank

    psp = packed_seq_params_of(case, batch)
    local = megatron_split(batch)
    ours = split_batch_for_cp_rank(batch, select_len=case.nsa["nsa_select_len"], packed_seq_params=psp)
    assert all(torch.equal(ours[k], v) for k, v in local.items()), "split_batch_for_cp_rank differs from megatron"
    per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"], packed_seq_params=psp)
    return per_token.sum() / batch["labels"].numel()


def sync_gradients(model) -> None:
    """What megatron's DDP and ``finalize_model_grads`` do to gradients, in place: sum over the context-parallel
    group (its ranks hold different tokens; DP = 1 here) and, for parameters marked ``sequence_parallel``, over the
    TP group."""
    from megatron.core import parallel_state

    for p in model.parameters():
        dist.all_reduce(p.grad, group=parallel_state.get_context_parallel_group())
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())


def full_gradients(model) -> Dict[str, torch.Tensor]:
    """Every parameter's synchronised gradient (:func:`sync_gradients`) as the full, TP-gathered tensor."""
    from megatron.core import parallel_state

    sync_gradients(model)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g, group=tp_group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g
    return out


def global_loss(model, case: GPTCase, batch) -> torch.Tensor:
    """The token-mean loss of the whole batch (this rank's share summed over the context-parallel group)."""
    from megatron.core import parallel_state

    loss = token_mean_loss(model, case, batch)
    total = loss.detach().clone()
    dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
    return loss, total


def shard_state_dict(full: Dict[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """``full`` (a TP = 1 state dict) cut to this TP rank's shapes by each parameter's ``partition_dim``."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    out = {}
    for name, value in model.state_dict().items():
        p = params.get(name)
        src = full[name]
        if p is not None and getattr(p, "tensor_model_parallel", False) and tp > 1:
            src = src.chunk(tp, dim=p.partition_dim)[rank]
        out[name] = src.clone() if isinstance(src, torch.Tensor) else src
    return out


def compare_with_single_rank(rank: int, world: int, case: GPTCase, tp: int, cp: int, sp: bool = False):
    """Loss and full gradients of the TP x CP model against the same weights on TP = CP = 1 (every rank computes
    the reference on the whole batch). Returns ``(loss, reference loss, {param: max abs grad diff},
    {param: max abs reference grad})``."""
    cpu_shim()
    batch = make_batch(case)
    init_parallel(1, 1)
    reference = build_model(case)
    full_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in reference.state_dict().items()}
    ref_loss = token_mean_loss(reference, case, batch)
    ref_loss.backward()
    ref_grads = full_gradients(reference)

    init_parallel(tp, cp)
    model = build_model(case, tp=tp, cp=cp, sp=sp, seed=case.seed + 1)  # other init: the loaded weights count
    model.load_state_dict(shard_state_dict(full_state, model))
    loss, loss_sum = global_loss(model, case, batch)
    loss.backward()
    grads = full_gradients(model)
    diffs = {n: float((grads[n] - ref_grads[n]).abs().max()) for n in ref_grads}
    scales = {n: float(ref_grads[n].abs().max()) for n in ref_grads}
    return float(loss_sum), float(ref_loss), diffs, scales


def checkpoint_round_trip(rank: int, world: int, case: GPTCase, save: Tuple[int, int], load: Tuple[int, int],
                          directory: str) -> Tuple[float, float]:
    """Train one SGD step at ``save = (TP, CP)``, save with megatron's distributed checkpointing, load into a
    freshly initialised model at ``load = (TP, CP)`` and return the next batch's loss of both models."""
    from megatron.core import dist_checkpointing

    cpu_shim()
    init_parallel(*save)
    model = build_model(case, tp=save[0], cp=save[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, _ = global_loss(model, case, make_batch(case, 0))
    loss.backward()
    sync_gradients(model)
    optimizer.step()
    with torch.no_grad():
        _, next_loss = global_loss(model, case, make_batch(case, 1))
    if rank == 0:
        os.makedirs(directory)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), directory)

    init_parallel(*load)
    fresh = build_model(case, tp=load[0], cp=load[1], seed=case.seed + 7)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), directory))
    with torch.no_grad():
        _, loaded_loss = global_loss(fresh, case, make_batch(case, 1))
    return float(next_loss), float(loaded_loss)


def layer_against_native(rank: int, world: int, docs: Optional[Tuple[int, ...]], rope: bool, G: int,
                         selection: Optional[Dict] = None, full_selection: bool = False):
    """``NSASelfAttention`` (TP = CP = 1, float64) and :class:`nsa_dist.NativeSparseAttention` with the same
    weights (the q/gate and K/V rows rearranged from Megatron's head-major layout) on the same input; rotary from a
    float64 RoPE table in Megatron's ``[S, 1, 1, D]`` format. ``selection``: extra NSA fields for both (e.g.
    ``selection_scoring``); ``full_selection``: both layers switched to the full-selection warm-up. Returns
    ``(megatron out, native out)`` as ``[b, s, h]``."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.spec_utils import build_module

    from nsa_dist import NativeSparseAttention, NSAConfig
    from nsa_dist.megatron import NSATransformerConfig
    from nsa_dist.megatron.spec import get_nsa_attention_spec

    init_parallel(1, 1)
    torch.manual_seed(3)
    H, Dk, s, h = 2, 16, 200, 48
    geometry = dict(block_len=8, stride=4, select_len=16, top_n=3, window=24, **(selection or {}))
    config = NSATransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=H * G, num_query_groups=H,
                                  kv_channels=Dk, add_bias_linear=False, use_cpu_initialization=True,
                                  params_dtype=torch.float64, **{f"nsa_{k}": v for k, v in geometry.items()})
    layer = build_module(get_nsa_attention_spec(), config=config, layer_number=1).double()
    native = NativeSparseAttention(NSAConfig(hidden_size=h, num_heads=H * G, num_kv_heads=H, head_dim=Dk,
                                             use_rope=rope, **geometry)).double()
    with torch.no_grad():
        qg = layer.linear_qg.weight.view(H * G, Dk + 3, h)
        native.q_proj.weight.copy_(qg[:, :Dk].reshape(-1, h))
        native.gate_proj.weight.copy_(qg[:, Dk:].reshape(-1, h))
        native.gate_proj.bias.zero_()
        native.kv_proj.weight.copy_(layer.linear_kv.weight.view(H, 3, 2 * Dk, h).transpose(0, 1).reshape(-1, h))
        native.o_proj.weight.copy_(layer.linear_proj.weight)
        for name in ("k_compressor", "v_compressor"):
            getattr(layer, name).mlp[-1].weight.normal_(std=0.05)
            getattr(native, name).load_state_dict(getattr(layer, name).state_dict())
    b = 1 if docs else 2
    x = torch.randn(s, b, h, dtype=torch.float64)
    psp, cu = None, None
    if docs:
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(docs),
                              max_seqlen_kv=max(docs))
    emb = None
    if rope:
        inv_freq = 10000.0 ** (-torch.arange(0, Dk, 2, dtype=torch.float64) / Dk)
        freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    layer.full_selection = native.full_selection = full_selection
    out, bias = layer(x, None, rotary_pos_emb=emb, packed_seq_params=psp)
    assert bias is None
    return out.transpose(0, 1).detach(), native(x.transpose(0, 1), cu_seqlens=cu).detach()


def cp_batch_errors(rank: int, world: int) -> List[Optional[str]]:
    """The errors of splitting over CP = 2 a 200-token batch with l' = 16 (chunks of 50 tokens), and a packed one
    whose documents of 98 and 102 tokens do not split into 2 * CP chunks, and of the NSA layer given that packed
    batch (None where nothing was raised); first asserts that a packed batch's ``[1, n]`` cu_seqlens pass whole."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.spec_utils import build_module

    from nsa_dist.megatron import NSATransformerConfig, split_batch_for_cp_rank
    from nsa_dist.megatron.spec import get_nsa_attention_spec
    from tests.helpers.cp_harness import value_error_messages

    init_parallel(1, 2)
    cu = torch.tensor([0, 98, 200], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=102, max_seqlen_kv=102)
    config = NSATransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
                                  context_parallel_size=2, nsa_block_len=8, nsa_stride=4, nsa_select_len=16)
    layer = build_module(get_nsa_attention_spec(), config=config, layer_number=1)
    tokens = {"tokens": torch.zeros(1, 200, dtype=torch.long)}
    packed = {"tokens": torch.arange(200)[None], "cu_seqlens": torch.tensor([[0, 100, 200]], dtype=torch.int32)}
    local = split_batch_for_cp_rank(packed, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=packed["cu_seqlens"][0], cu_seqlens_kv=packed["cu_seqlens"][0]))
    assert local["cu_seqlens"] is packed["cu_seqlens"], "packed metadata must pass whole, as megatron-core's split"
    assert local["tokens"][0, :25].tolist() == list(range(25 * rank, 25 * rank + 25)), local["tokens"]
    return value_error_messages([
        lambda: split_batch_for_cp_rank(tokens, select_len=16),
        lambda: split_batch_for_cp_rank(tokens, select_len=16, packed_seq_params=psp),
        lambda: layer(torch.randn(100, 1, 32), None, packed_seq_params=psp)])
