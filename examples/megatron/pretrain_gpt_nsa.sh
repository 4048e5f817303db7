#!/usr/bin/env bash
# Megatron-style launcher for pretrain_gpt_nsa.py: sizes from environment variables, one torchrun per node.
# Extra arguments pass through to the script (e.g. --cpu, --save DIR, --nsa-window 256).
#
#   GPUS_PER_NODE=2 CP=2 SEQ_LEN=131072 RECOMPUTE=1 bash examples/megatron/pretrain_gpt_nsa.sh
#   GPUS_PER_NODE=2 TP=2 bash examples/megatron/pretrain_gpt_nsa.sh
#   GPUS_PER_NODE=2 CP=2 NUM_LAYERS=2 HIDDEN_SIZE=64 NUM_HEADS=4 NUM_QUERY_GROUPS=2 SEQ_LEN=256 BF16=0 \
#       bash examples/megatron/pretrain_gpt_nsa.sh --cpu          # CPU smoke test on gloo
# Multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 on each node.
set -euo pipefail

DETECTED_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( DETECTED_GPUS > 0 ? DETECTED_GPUS : 1 ))}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

ATTENTION=${ATTENTION:-nsa}            # nsa | dense (megatron's local attention: no CP, O(seq^2) memory)
NUM_LAYERS=${NUM_LAYERS:-12}
HIDDEN_SIZE=${HIDDEN_SIZE:-2048}
NUM_HEADS=${NUM_HEADS:-16}
NUM_QUERY_GROUPS=${NUM_QUERY_GROUPS:-1}  # 16 query heads per KV head, as NSA's selection favours
SEQ_LEN=${SEQ_LEN:-8192}
MICRO_BATCH=${MICRO_BATCH:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-8}
TRAIN_ITERS=${TRAIN_ITERS:-100}
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-3e-5}
WARMUP_ITERS=${WARMUP_ITERS:-10}
TP=${TP:-1}
PP=${PP:-1}
CP=${CP:-1}
SP=${SP:-0}                             # 1: sequence parallelism (needs TP > 1)
BF16=${BF16:-1}
DIST_OPT=${DIST_OPT:-1}                 # 1: the distributed optimizer
RECOMPUTE=${RECOMPUTE:-0}               # 1: full activation recompute (long sequences)
DATA_PATH=${DATA_PATH:-}                # Megatron indexed dataset prefix; empty: mock data
VOCAB_SIZE=${VOCAB_SIZE:-257}           # 257: byte-level tokens of make_byte_dataset.py
LOG_INTERVAL=${LOG_INTERVAL:-10}
JSON_LOG=${JSON_LOG:-}

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
                  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
MODEL_ARGS=(--attention "$ATTENTION" --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE"
            --num-attention-heads "$NUM_HEADS" --num-query-groups "$NUM_QUERY_GROUPS" --seq-length "$SEQ_LEN"
            --vocab-size "$VOCAB_SIZE" --position-embedding-type rope)
TRAINING_ARGS=(--micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
               --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS" --weight-decay 0.1 --clip-grad 1.0)
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
               --context-parallel-size "$CP")
LOGGING_ARGS=(--log-interval "$LOG_INTERVAL")
[[ "$SP" == 1 ]] && PARALLEL_ARGS+=(--sequence-parallel)
[[ "$BF16" == 1 ]] && TRAINING_ARGS+=(--bf16)
[[ "$DIST_OPT" == 1 ]] && TRAINING_ARGS+=(--use-distributed-optimizer)
[[ "$RECOMPUTE" == 1 ]] && TRAINING_ARGS+=(--recompute-activations)
DATA_ARGS=()
[[ -n "$DATA_PATH" ]] && DATA_ARGS+=(--data-path $DATA_PATH)  # unquoted: "W1 PREFIX1 W2 PREFIX2" blends
[[ -n "$JSON_LOG" ]] && LOGGING_ARGS+=(--json-log "$JSON_LOG")

exec python -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" "$(dirname "$0")/pretrain_gpt_nsa.py" \
    "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
