"""Pretrain a GPT with NSA self-attention through Megatron-LM's own training loop, ``megatron.training.pretrain``.

For megatron-core >= 0.17, whose wheel ships ``megatron.training`` (written against 0.19.2, where ``pretrain``
takes a config container built from the parsed arguments); megatron-core 0.15 and 0.16 have no
``megatron.training``: use ``pretrain_gpt_nsa.py`` there. Everything but the data and loss plumbing is
Megatron's: its argument parser (plus ``--nsa-*`` from ``nsa_dist.megatron.add_nsa_arguments``), its GPT model
builder with the layer spec named by ``--spec nsa_dist.megatron nsa_layer_spec``, optimizer, schedules, logging
and checkpoints. The datasets provider, ``get_batch``, ``loss_func`` and ``forward_step`` follow Megatron-LM's
``pretrain_gpt.py``, except that no attention mask is built (NSA is causal by construction) and
``forward_step`` switches the NSA layers' full-selection warm-up (``--nsa-selection-warmup-steps``).

One GPU, mock data, no Transformer Engine or apex::

    torchrun --nproc-per-node 1 examples/megatron/pretrain_gpt_nsa_training.py \\
        --spec nsa_dist.megatron nsa_layer_spec --nsa-window 512 --nsa-top-n 16 \\
        --transformer-impl local --no-gradient-accumulation-fusion --no-persist-layer-norm \\
        --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-rope-fusion \\
        --num-layers 4 --hidden-size 512 --num-attention-heads 16 --group-query-attention --num-query-groups 4 \\
        --seq-length 4096 --max-position-embeddings 4096 --position-embedding-type rope \\
        --micro-batch-size 1 --global-batch-size 8 --train-iters 20 --lr 3e-4 --min-lr 3e-5 \\
        --lr-decay-style cosine --lr-warmup-iters 2 --bf16 --mock-data --tokenizer-type NullTokenizer \\
        --vocab-size 32000 --eval-interval 10 --eval-iters 2 --log-interval 1 --no-one-logger

``--context-parallel-size`` splits each sequence zigzag over the CP ranks (``--seq-length`` a multiple of
``2 * CP * --nsa-select-len``); ``--data-path`` takes Megatron indexed datasets instead of ``--mock-data``. Without
``--spec`` Megatron builds its own dense layer (with ``--transformer-impl local``: unfused ``DotProductAttention``),
the same GPT with dense attention, to compare.
"""
import os
from functools import partial

import torch
from megatron.core import mpu
from megatron.core.datasets import utils as datasets_utils
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
from megatron.training import get_args, get_timers, get_tokenizer, pretrain, print_rank_0
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from nsa_dist.megatron import add_nsa_arguments
from nsa_dist.selection_warmup import set_full_selection

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def get_batch(data_iterator, vp_stage=None):
    """This rank's micro-batch as Megatron-LM's ``get_batch``: read on tensor-parallel rank 0, broadcast over the
    tensor-parallel group, then this context-parallel rank's zigzag share (Megatron's split, the layout NSA's
    context parallelism expects). Middle pipeline stages get None."""
    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None
    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = {key: value.cuda(non_blocking=True) for key, value in next(data_iterator).items() if key in BATCH_KEYS}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False, create_attention_mask_in_dataloader=False,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size, tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length, mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(), is_pipeline_last_stage=mpu.is_pipeline_last_stage())
    batch = get_batch_on_this_cp_rank({key: batch[key] for key in BATCH_KEYS}, is_hybrid_cp=False,
                                      cp_group=mpu.get_context_parallel_group())
    return tuple(batch[key] for key in BATCH_KEYS)


def loss_func(loss_mask, output_tensor):
    """Megatron-LM's GPT loss contract: the token sum of the per-token losses, the token count, and the report
    ``[loss sum, tokens]`` that the training loop sums over data- and context-parallel ranks."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    """One micro-batch through the model (no attention mask: NSA is causal); the NSA layers use full selection
    for the first ``--nsa-selection-warmup-steps`` iterations (and the validations among them)."""
    args, timers = get_args(), get_timers()
    set_full_selection(model, args.curr_iteration < args.nsa_selection_warmup_steps)
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, position_ids = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    output_tensor = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask)


def is_dataset_built_on_rank(vp_stage=None):
    """Datasets are read where ``get_batch`` reads them: first or last pipeline stage, tensor-parallel rank 0."""
    return is_first_or_last_pipeline_stage(vp_stage) and mpu.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets (``MockGPTDataset`` with ``--mock-data``, else ``GPTDataset`` over ``--data-path``
    or the per-split paths), without attention masks."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files, tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=False)
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    return BlendedMegatronDatasetBuilder(
        MockGPTDataset if args.mock_data else GPTDataset, train_val_test_num_samples,
        partial(is_dataset_built_on_rank, vp_stage=vp_stage), config).build()


def use_prebuilt_dataset_helpers():
    """``initialize_megatron`` compiles megatron-core's C++ dataset helpers with ``make`` in the package folder and
    exits when that fails; the megatron-core wheel ships them compiled, without the Makefile. There, skip the
    compilation (a source checkout, with its Makefile, still compiles)."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    if not os.path.exists(os.path.join(os.path.dirname(datasets_utils.__file__), "Makefile")):
        datasets_utils.compile_helpers = lambda: None


if __name__ == "__main__":
    use_prebuilt_dataset_helpers()
    train_valid_test_datasets_provider.is_distributed = True
    args = parse_and_validate_args(extra_args_provider=add_nsa_arguments)
    pretrain(pretrain_cfg_container_from_args(args, gpt_config_from_args(args)), train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, forward_step)
