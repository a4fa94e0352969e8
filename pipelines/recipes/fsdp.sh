#!/usr/bin/env bash
# ViT-B/16 with the text branch under FSDP on one 8-GPU machine: parameters, gradients and optimizer
# state sharded (FULL_SHARD), for models whose DDP copy plus AdamW state does not fit a GPU. For ViT-B
# DDP (configs/accelerate/8gpu.yaml) is enough and simpler; use this recipe as the template for larger
# towers (e.g. model.name=ViT-L-14).
#
# NOT RUN: nothing here has been run on GPUs. Written from configs/accelerate/fsdp.yaml, whose header
# says what is tested: tests/test_accelerate_configs.py checks that accelerate 1.x parses it, that the
# FSDP plugin accepts the values its launcher passes on, and that the wrapped class exists in our model.
# Checked here: `bash -n`.
#
#   SHARDS='/data/cc3m/{00000..00331}.tar' pipelines/recipes/fsdp.sh     (from the repository root)
#
# What the config does, and why (from its header):
#   - FSDP version 1, not 2: FSDP2's fully_shard refuses 0-dim parameters and open_clip's logit_scale is
#     a scalar (measured with torch's fully_shard).
#   - Each ResidualAttentionBlock (every vision and text transformer layer) is its own FSDP unit; the
#     embeddings, projections, logit scale and the text heads (tied to the token embedding) stay in the
#     root unit. fsdp_use_orig_params keeps the optimizer's decay / no-decay groups on the real parameters.
#   - FULL_STATE_DICT checkpoints: the main process gathers the whole model, so a checkpoint is not per-rank
#     shards. accelerate writes it as pytorch_model_fsdp.bin; the trainer also writes model.safetensors
#     into each checkpoint, which `mmpretrain eval` and `mmpretrain export` read, so evaluation and export
#     work as after DDP.
#   - Exact contrastive accumulation (train.accum_steps > 1) is allowed under FSDP (unlike DeepSpeed).
#   - Resume: train.resume=latest, on any number of processes and data.num_workers (the data order is global).
set -euo pipefail

SHARDS=${SHARDS:-"/data/cc3m/{00000..00331}.tar"}
VAL_SHARDS=${VAL_SHARDS:-"/data/cc3m-val/{00000..00001}.tar"}
CONFIG=${CONFIG:-configs/train/vit-b-16.yaml}
RUN=${RUN:-runs/vit-b-16-fsdp}
ACCUM=${ACCUM:-1}                 # 2: global batch 4096 (8 GPUs x 256 x 2), exact

mmpretrain inspect "$SHARDS"

# Preempted or killed? Run the same command again (train.resume=latest).
# Under FSDP gradient checkpointing can also be done by the config's model.grad_checkpointing (on in
# vit-b-16.yaml); keep fsdp_activation_checkpointing false in the YAML so the two do not stack.
accelerate launch --config_file configs/accelerate/fsdp.yaml -m mmpretrain.train --config "$CONFIG" \
    data.train_shards="$SHARDS" eval.retrieval_shards="$VAL_SHARDS" \
    train.output_dir="$RUN" train.accum_steps="$ACCUM" train.resume=latest

# Evaluation and export read the checkpoint's model.safetensors: no FSDP needed for them.
accelerate launch --config_file configs/accelerate/8gpu.yaml -m mmpretrain eval retrieval \
    --checkpoint "$RUN" --shards "$VAL_SHARDS" --precision bf16 --no-progress --out "$RUN/retrieval.json"
mmpretrain export --checkpoint "$RUN" --out "exported/$(basename "$RUN")" --overwrite
