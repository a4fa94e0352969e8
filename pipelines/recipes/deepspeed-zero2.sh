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
#   - Resume: train.resume=latest, with the same number of processes and data.num_workers.
set -euo pipefail

SHARDS=${SHARDS:-"/data/cc3m/{00000..00331}.tar"}
VAL_SHARDS=${VAL_SHARDS:-"/data/cc3m-val/{00000..00001}.tar"}
CONFIG=${CONFIG:-configs/train/vit-b-16.yaml}
RUN=${RUN:-runs/vit-b-16-zero2}

python -c "import deepspeed" 2> /dev/null || { echo "deepspeed is not installed: pip install deepspeed" >&2; exit 2; }
mmpretrain inspect "$SHARDS"

# Preempted or killed? Run the same command again (train.resume=latest).
accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml -m mmpretrain.train --config "$CONFIG" \
    data.train_shards="$SHARDS" eval.retrieval_shards="$VAL_SHARDS" \
    train.output_dir="$RUN" train.accum_steps=1 optim.grad_clip=1.0 train.resume=latest

# Caution, unverified: `mmpretrain eval` and `mmpretrain export` read the checkpoint's model.safetensors.
# The trainer writes that file itself under FSDP; under DeepSpeed it relies on accelerate's save_state,
# which saves through the DeepSpeed engine (its own layout, e.g. pytorch_model/mp_rank_00_model_states.pt).
# If eval does not recognise RUN/checkpoints/step-*/ as a checkpoint, that is the gap: consolidate with
# the zero_to_fp32.py script DeepSpeed leaves in the checkpoint, or train under FSDP / DDP.
accelerate launch --config_file configs/accelerate/8gpu.yaml -m mmpretrain eval retrieval \
    --checkpoint "$RUN" --shards "$VAL_SHARDS" --precision bf16 --no-progress --out "$RUN/retrieval.json"
mmpretrain export --checkpoint "$RUN" --out "exported/$(basename "$RUN")" --overwrite
