#!/usr/bin/env bash
# ViT-B/16 with the text branch under DeepSpeed ZeRO-2 on one 8-GPU machine: optimizer state and gradients
# sharded, parameters replicated.
#
# NOT RUN: nothing here has been run on GPUs, and DeepSpeed is not installed where this was written.
# Written from configs/accelerate/deepspeed-zero2.yaml, whose header says what is tested:
# tests/test_accelerate_configs.py checks that accelerate 1.x parses it. Checked here: `bash -n`.
#
#   pip install deepspeed              (not a dependency of mmpretrain)
#   SHARDS='/data/cc3m/{00000..00331}.tar' pipelines/recipes/deepspeed-zero2.sh   (from the repository root)
#
# Rules that come from how DeepSpeed and accelerate interact (the YAML header explains them):
#   - train.accum_steps must be 1. DeepSpeed's engine steps the optimizer inside backward, which breaks
#     exact contrastive accumulation, so the trainer refuses accum_steps > 1 under DeepSpeed; the YAML's
#     gradient_accumulation_steps is 1 to match. For a bigger global batch raise data.batch_size (ZeRO-2
#     frees optimizer memory; activations still dominate at B/16, hence grad checkpointing) or use FSDP /
#     DDP with train.accum_steps.
#   - Gradient clipping happens inside the engine (gradient_clipping: 1.0 in the YAML); accelerate's
#     clip_grad_norm_ only reports the norm. Keep it equal to optim.grad_clip (1.0 in the recipes).
#   - Resume: not exact under DeepSpeed (see below); start again from the weights with model.pretrained.
set -euo pipefail

SHARDS=${SHARDS:-"/data/cc3m/{00000..00331}.tar"}
VAL_SHARDS=${VAL_SHARDS:-"/data/cc3m-val/{00000..00001}.tar"}
CONFIG=${CONFIG:-configs/train/vit-b-16.yaml}
RUN=${RUN:-runs/vit-b-16-zero2}

python -c "import deepspeed" 2> /dev/null || { echo "deepspeed is not installed: pip install deepspeed" >&2; exit 2; }
mmpretrain inspect "$SHARDS"

# Under DeepSpeed a checkpoint holds the full weights but not the engine's (pickled) optimizer state, so
# train.resume is refused: after a preemption start a new run from the last weights with
# model.pretrained=RUN/checkpoints/step-N/model.safetensors (or train under FSDP for exact resume).
accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml -m mmpretrain.train --config "$CONFIG" \
    data.train_shards="$SHARDS" eval.retrieval_shards="$VAL_SHARDS" \
    train.output_dir="$RUN" train.accum_steps=1 optim.grad_clip=1.0

# eval and export read the checkpoint's model.safetensors, which the trainer writes under DeepSpeed too.
accelerate launch --config_file configs/accelerate/8gpu.yaml -m mmpretrain eval retrieval \
    --checkpoint "$RUN" --shards "$VAL_SHARDS" --precision bf16 --no-progress --out "$RUN/retrieval.json"
mmpretrain export --checkpoint "$RUN" --out "exported/$(basename "$RUN")" --overwrite
