"""Pretrain a GPT with Native Sparse Attention on megatron-core alone (the pip package has no pretrain_gpt.py).

megatron's GPTModel with NSA self-attention (``nsa_dist.megatron.get_gpt_decoder_block_nsa_spec``) or megatron's
own local dense attention (``--attention dense``), wrapped in megatron's DDP and trained by the Megatron optimizer
(optionally the distributed optimizer) through ``get_forward_backward_func``; tensor, context, pipeline and
data parallel sizes come from the command line (data parallel = world size / (TP * CP * PP)). Data is megatron's
mock GPT data or a Megatron indexed dataset (``--data-path``; ``make_byte_dataset.py`` writes one from text).
Every ``--log-interval`` iterations the last rank (last pipeline stage) prints loss, tokens/s and peak memory
(and appends a JSON line to ``--json-log``). Checkpoints are megatron dist_checkpointing directories.

    torchrun --nproc-per-node 2 examples/megatron/pretrain_gpt_nsa.py --context-parallel-size 2 --seq-length 8192

``--cpu`` runs on gloo without a GPU (smoke tests); see ``install_cpu_shims`` for what that changes.
"""
import argparse
import importlib.util
import json
import math
import os
import resource
import time
from functools import partial

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from nsa_dist.megatron import (NSATransformerConfig, add_nsa_arguments, get_gpt_decoder_block_nsa_spec,
                               nsa_fields_from_args, split_batch_for_cp_rank)
from nsa_dist.selection_warmup import set_full_selection

# the distributed optimizer's checkpoint format (Megatron-LM's default): one shard per data-parallel rank
OPTIMIZER_CKPT = {"distrib_optim_sharding_type": "dp_reshardable"}


def parse_args(argv=None):
    """Megatron-LM's argument names for what this script supports."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--attention", choices=["nsa", "dense"], default="nsa",
      help="nsa: nsa_dist's spec; dense: megatron's local spec (unfused DotProductAttention: no CP, O(s^2) memory)")
    a("--num-layers", type=int, default=12)
    a("--hidden-size", type=int, default=768)
    a("--num-attention-heads", type=int, default=12)
    a("--num-query-groups", type=int, default=None, help="KV heads (GQA); default: one per attention head")
    a("--ffn-hidden-size", type=int, default=None, help="default: 4 * hidden size")
    a("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    a("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope")
    a("--rotary-base", type=int, default=10000)
    a("--untie-embeddings-and-output-weights", action="store_true")
    a("--seq-length", type=int, default=4096)
    a("--micro-batch-size", type=int, default=1)
    a("--global-batch-size", type=int, default=8)
    a("--train-iters", type=int, default=100)
    a("--lr", type=float, default=3e-4)
    a("--min-lr", type=float, default=3e-5)
    a("--lr-warmup-iters", type=int, default=10)
    a("--weight-decay", type=float, default=0.1)
    a("--clip-grad", type=float, default=1.0)
    a("--tensor-model-parallel-size", type=int, default=1)
    a("--pipeline-model-parallel-size", type=int, default=1)
    a("--context-parallel-size", type=int, default=1)
    a("--sequence-parallel", action="store_true")
    a("--bf16", action="store_true")
    a("--use-distributed-optimizer", action="store_true")
    a("--recompute-activations", action="store_true", help="full recompute of every layer (long sequences)")
    a("--data-path", nargs="+", default=None,
      help="Megatron indexed dataset prefix(es), optionally weighted: [W1] PREFIX1 [W2 PREFIX2 ...]; "
           "absent: mock data")
    a("--vocab-size", type=int, default=257,
      help="tokens are < vocab size, the end-of-document token is vocab size - 1 (257: make_byte_dataset.py)")
    a("--seed", type=int, default=1234)
    a("--log-interval", type=int, default=10)
    a("--save", default=None, help="checkpoint directory (megatron dist_checkpointing, one iter_NNNNNNN per save)")
    a("--load", default=None, help="resume from the latest checkpoint in this directory")
    a("--save-interval", type=int, default=None, help="default: save only at the end (when --save is given)")
    a("--json-log", default=None, help="append one JSON line per log step to this file")
    a("--cpu", action="store_true", help="gloo on the CPU, for smoke tests")
    add_nsa_arguments(p)  # --nsa-window etc.: NSATransformerConfig's fields, its defaults (the paper's)
    return p.parse_args(argv)


def check_args(args, world_size):
    """Sizes that cannot work, as ValueErrors naming the values; derives data parallel size and micro-batches."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp}")
    args.data_parallel_size = world_size // (tp * pp * cp)
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by micro batch size * "
                         f"data parallel size = {args.micro_batch_size} * {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // per_step
    if args.save and importlib.util.find_spec("psutil") is None:
        raise ImportError("--save needs psutil (pip install psutil): megatron-core's dist_checkpointing writer "
                          "imports it in its worker processes and hangs without it")
    if args.load and args.use_distributed_optimizer and not distrib_optimizer.HAVE_APEX_OR_TE:
        raise ValueError("--load with --use-distributed-optimizer needs Transformer Engine or apex: with torch's "
                         "Adam, megatron-core's distributed optimizer cannot restore its state (it builds the load "
                         "template from optimizer state that exists only after a step, and restores one step "
                         "counter shared by all parameters); runs that must resume here train without it")
    if not 0 <= args.lr_warmup_iters < args.train_iters:
        raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be in [0, --train-iters {args.train_iters})")
    if args.num_layers % pp:
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.attention == "dense" and cp > 1:
        raise ValueError(f"--attention dense refuses --context-parallel-size {cp}: megatron's local "
                         "DotProductAttention has no context parallelism")
    if args.attention == "nsa" and cp > 1 and args.seq_length % (2 * cp * args.nsa_select_len):
        raise ValueError(f"--seq-length {args.seq_length} is not divisible by 2 * CP * nsa select len = "
                         f"2 * {cp} * {args.nsa_select_len}: every zigzag chunk must hold whole selection blocks")
    if args.sequence_parallel and (tp == 1 or (args.seq_length // cp) % tp):
        raise ValueError(f"--sequence-parallel needs TP > 1 dividing seq length / CP: TP={tp}, "
                         f"seq length {args.seq_length}, CP={cp}")


class _CpuAsCuda(torch.overrides.TorchFunctionMode):
    """Megatron-core on CPU tensors: what it creates with ``device="cuda"`` (or a CUDA index) is created on the
    CPU (the schedules' token counter, optimizer scale / found-inf tensors, grad-norm and p2p buffers), nothing
    is pinned (rope's CP index), ``Tensor.cuda()`` is a no-op, and ``Tensor.type()`` names a CPU tensor by its
    CUDA type (the optimizers and clip_grads accept only ``torch.cuda.*Tensor`` names)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


def install_cpu_shims():
    """--cpu: megatron-core hard-codes CUDA in a few places that the CPU run goes through; point them at the
    CPU. Only CUDA device lookups, device="cuda" tensor creation and the CUDA RNG change."""
    # utils.GlobalMemoryBuffer.get_tensor, RotaryEmbedding.get_emb, DDP grad buffers, p2p receive buffers
    torch.cuda.current_device = lambda: torch.device("cpu")
    # p2p_communication (batch_p2p_sync) and parallel_state call it after collectives
    torch.cuda.synchronize = lambda device=None: None
    # the model-parallel RNG tracker (forked by the embedding under sequence parallelism and by activation
    # recompute) keeps CPU generator states instead of CUDA ones
    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    tensor_parallel.random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tensor_parallel.random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _CpuAsCuda().__enter__()  # stays active for the whole process


def init_distributed(args):
    """torch.distributed from torchrun's environment (nccl, or gloo under --cpu), megatron's parallel groups,
    seeds as Megatron-LM sets them (seed + 100 * pipeline rank; TP ranks get their own model-parallel RNG stream)."""
    if args.cpu:
        install_cpu_shims()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend="gloo" if args.cpu else "nccl")
    check_args(args, torch.distributed.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
    )
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def padded_vocab_size(vocab_size, tp):
    """Megatron-LM's padding: a multiple of 128 * TP, so the vocab splits evenly over tensor-parallel ranks."""
    multiple = 128 * tp
    return math.ceil(vocab_size / multiple) * multiple


def transformer_config(args):
    """NSATransformerConfig (or megatron's TransformerConfig for dense) from the arguments."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    common = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size,
        normalization=args.normalization, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size, sequence_parallel=args.sequence_parallel,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=args.cpu,
        calculate_per_token_loss=True,  # gradients are the token mean over the global batch (see loss_func)
    )
    if args.recompute_activations:
        common.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if args.attention == "dense":
        return TransformerConfig(**common)
    return NSATransformerConfig(**common, **nsa_fields_from_args(args))


def build_model(args, config):
    """GPTModel for this pipeline stage (bf16 via Float16Module), wrapped in megatron's DDP."""
    if args.attention == "nsa":  # the decoder block spec: its final norm supports sequence parallelism too
        spec = get_gpt_decoder_block_nsa_spec(config, normalization=args.normalization)
    else:
        spec = get_gpt_layer_local_spec(normalization=args.normalization)
    model = GPTModel(
        config=config, transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(args.vocab_size, args.tensor_model_parallel_size),
        max_sequence_length=args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
    )
    if not args.cpu:
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    model.broadcast_params()  # every data-parallel replica starts from the same weights
    return model


def build_optimizer(args, model):
    """Megatron Adam (distributed across data-parallel ranks with --use-distributed-optimizer) with linear
    warmup and cosine decay to --min-lr over --train-iters."""
    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=0.9,
        adam_beta2=0.95, clip_grad=args.clip_grad, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config=opt_config, model_chunks=[model])
    scheduler = OptimizerParamScheduler(
        optimizer=optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.train_iters, lr_decay_style="cosine",
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant")
    return optimizer, scheduler


class ByteTokenizer:
    """What megatron's GPT datasets read from a tokenizer: vocab size and the end-of-document id
    (vocab size - 1: 256 for bytes). Text is tokenized beforehand (make_byte_dataset.py)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size}


def build_data_iterator(args, start_iteration):
    """Endless iterator over this data-parallel rank's micro-batches (dicts of [b, s] tensors), starting after
    the samples that iterations up to ``start_iteration`` consumed. Mock data: megatron's MockGPTDataset
    (documents counting up 1, 2, 3, ... mod vocab: learnable)."""
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=get_blend_from_list(args.data_path),
        split="1,0,0" if args.data_path else None, tokenizer=ByteTokenizer(args.vocab_size),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,  # NSA (and the local attention) build their own causal structure
    )
    num_samples = args.train_iters * args.global_batch_size
    dataset_cls = GPTDataset if args.data_path else MockGPTDataset
    train, _, _ = BlendedMegatronDatasetBuilder(
        cls=dataset_cls, sizes=[num_samples, 0, 0], is_built_on_rank=lambda: True, config=config).build()
    dp_rank, mbs = parallel_state.get_data_parallel_rank(), args.micro_batch_size
    stride = mbs * args.data_parallel_size

    def batches():
        for start in range(start_iteration * args.global_batch_size, len(train), stride):
            samples = [train[i] for i in range(start + dp_rank * mbs, start + (dp_rank + 1) * mbs)]
            yield {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask",
                                                                          "position_ids")}
    return batches()


def loss_func(loss_mask, output_tensor):
    """Token-sum cross-entropy of this rank's shard and its token count, the 0.16+ 3-tuple contract:
    (loss, num_tokens, report). With config.calculate_per_token_loss the schedule does not divide, and
    finalize_model_grads divides the data+context-parallel gradient sum by the global token count: the
    gradient is that of the token mean over the global batch. The report [loss sum, tokens] is summed over
    the CP group (as pretrain_gpt's loss_func does) so each data-parallel rank reports whole sequences."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), mask.sum()])
    if parallel_state.get_context_parallel_world_size() > 1:
        torch.distributed.all_reduce(report, group=parallel_state.get_context_parallel_group())
    return loss, num_tokens, {"lm loss": report}


def forward_step(args, device, data_iterator, model):
    """One micro-batch: this CP rank's zigzag share of the sequence through the model (attention_mask=None;
    the model returns per-token losses when given labels)."""
    batch = {key: value.to(device) for key, value in next(data_iterator).items()}
    if args.context_parallel_size > 1:
        batch = split_batch_for_cp_rank(batch, select_len=args.nsa_select_len,
                                        cp_group=parallel_state.get_context_parallel_group())
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def save_checkpoint(args, iteration, model, optimizer, scheduler):
    """dist_checkpointing save of model, optimizer and scheduler into --save/iter_NNNNNNN, then the tracker
    file Megatron-LM uses (latest_checkpointed_iteration.txt)."""
    path = os.path.join(args.save, f"iter_{iteration:07d}")
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    model_sd = model.module.sharded_state_dict()  # inside DDP: keys as Megatron-LM's (no "module." prefix)
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_CKPT),
             "scheduler": scheduler.state_dict(), "iteration": iteration}
    dist_checkpointing.save(sharded_state_dict=state, checkpoint_dir=path)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(args.save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    print_rank_last(f"saved checkpoint {path}")


def load_checkpoint(args, model, optimizer, scheduler):
    """Loads the latest checkpoint in --load (if there is one) and returns its iteration, else 0."""
    tracker = os.path.join(args.load, "latest_checkpointed_iteration.txt")
    if not os.path.exists(tracker):
        print_rank_last(f"no checkpoint in {args.load}: starting from scratch")
        return 0
    with open(tracker) as f:
        path = os.path.join(args.load, f"iter_{int(f.read()):07d}")
    model_sd = model.module.sharded_state_dict()
    state = {"model": model_sd,
             "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_CKPT),
             "scheduler": scheduler.state_dict(), "iteration": 0}
    state = dist_checkpointing.load(sharded_state_dict=state, checkpoint_dir=path)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    print_rank_last(f"loaded checkpoint {path} (iteration {state['iteration']})")
    return state["iteration"]


def print_rank_last(message):
    """Print on the last rank (it holds the last pipeline stage, where the loss is)."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(message, flush=True)


def peak_memory_mib(args, device):
    """Peak memory over all ranks: CUDA max allocated, or the process's max RSS under --cpu."""
    if args.cpu:
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        value = torch.cuda.max_memory_allocated() / 2 ** 20
    peak = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return peak.item()


def reduce_loss(losses_reduced, device):
    """Token-mean loss of the global batch from the last stage's per-micro-batch reports (nan elsewhere)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for report in losses_reduced:
        total += report["lm loss"].to(total)
    if parallel_state.is_pipeline_last_stage():
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return (total[0] / total[1]).item()
    return float("nan")


def log_step(args, record):
    """Print one log line on the last rank and append the record to --json-log."""
    grad_norm = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
    print_rank_last(f"iteration {record['iteration']:6d}/{args.train_iters} | loss {record['loss']:.4f} | "
                    f"tokens/s {record['tokens_per_s']:,.0f} | step {record['step_ms']:.1f} ms | "
                    f"peak memory {record['peak_memory_mib']:,.0f} MiB | lr {record['lr']:.3g} | "
                    f"grad norm {grad_norm}")
    if args.json_log and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(args.json_log, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(args):
    """Build everything, then iterate: forward_backward_func, optimizer step, scheduler step, logging, saving.
    Logged step time and tokens/s (global batch tokens / step time) average the iterations since the last log."""
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    config = transformer_config(args)
    model = build_model(args, config)
    optimizer, scheduler = build_optimizer(args, model)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    start = load_checkpoint(args, model, optimizer, scheduler) if args.load else 0
    data_iterator = build_data_iterator(args, start)
    forward_backward = get_forward_backward_func()
    print_rank_last(f"{args.attention} GPT: {sum(p.numel() for p in model.parameters()):,} parameters on this "
                    f"rank, TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
                    f"CP={args.context_parallel_size} DP={args.data_parallel_size}, "
                    f"{args.num_microbatches} micro-batches of {args.micro_batch_size} x {args.seq_length}")
    window_start, window_iters = time.perf_counter(), 0
    for iteration in range(start + 1, args.train_iters + 1):
        set_full_selection(model, iteration <= args.nsa_selection_warmup_steps)  # the full-selection warm-up
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses_reduced = forward_backward(
            forward_step_func=partial(forward_step, args, device), data_iterator=data_iterator, model=[model],
            num_microbatches=args.num_microbatches, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False)
        lr = optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        window_iters += 1
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            loss = reduce_loss(losses_reduced, device)
            if not args.cpu:
                torch.cuda.synchronize()
            step_s = (time.perf_counter() - window_start) / window_iters
            log_step(args, {"iteration": iteration, "loss": loss,
                            "tokens_per_s": args.global_batch_size * args.seq_length / step_s,
                            "peak_memory_mib": peak_memory_mib(args, device), "step_ms": 1e3 * step_s,
                            "lr": lr, "grad_norm": grad_norm})
            window_start, window_iters = time.perf_counter(), 0
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save_start = time.perf_counter()
            save_checkpoint(args, iteration, model, optimizer, scheduler)
            window_start += time.perf_counter() - save_start  # saving is not training time
    if args.save and not (args.save_interval and args.train_iters % args.save_interval == 0):
        save_checkpoint(args, args.train_iters, model, optimizer, scheduler)


def main(argv=None):
    args = parse_args(argv)
    init_distributed(args)
    train(args)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
