#!/usr/bin/env bash
# ViT-B/32 on one 8-GPU machine, from img2dataset-style shards (CC3M, a LAION/DataComp subset) to an
# open_clip model directory: inspect the shards, train with the MLM/AR text branch and without it
# (plain CLIP, the baseline), evaluate both, export both.
#
# NOT RUN AS A WHOLE: nothing here has been run on GPUs. It is written from the configs it launches
# (configs/train/vit-b-32*.yaml, configs/accelerate/8gpu.yaml, whose headers say what is tested where);
# the same commands run on CPU at tiny scale in pipelines/quickstart.sh and pipelines/compare_objectives.sh.
# Checked: `bash -n`. Read it, set the variables, run the steps you need.
#
#   SHARDS='/data/cc3m/{00000..00331}.tar' VAL_SHARDS='/data/cc3m-val/{00000..00001}.tar' \
#       pipelines/recipes/vit-b-32-8gpu.sh            (from the repository root, with .venv activated)
#
# Budget (the configs): 20k steps x global batch 4096 (512 per GPU) = 82M samples, ~28 passes over CC3M.
set -euo pipefail

# -- what to change ----------------------------------------------------------------------------------
SHARDS=${SHARDS:-"/data/cc3m/{00000..00331}.tar"}          # training shards (brace pattern, glob or folder)
VAL_SHARDS=${VAL_SHARDS:-"/data/cc3m-val/{00000..00001}.tar"}   # held-out image-text shards (retrieval)
ZEROSHOT_SHARDS=${ZEROSHOT_SHARDS:-}                      # labelled shards (KEY.cls), e.g. shards/imagenet-val/train
CLASSNAMES=${CLASSNAMES:-}                                # one readable class name per line, label 0 first
TEXT_VAL=${TEXT_VAL:-}                                    # held-out text shards for MLM accuracy / AR perplexity
RUNS=${RUNS:-runs/cc3m}                                   # one run directory per recipe under here
ACCEL=${ACCEL:-configs/accelerate/8gpu.yaml}
PREPARE_URLS=${PREPARE_URLS:-}                            # a URL parquet/CSV/TSV: step 0 builds $SHARDS from it
IMAGE_COLUMN=${IMAGE_COLUMN:-URL}                         # its columns (LAION's names; CC3M TSV: url, caption)
CAPTION_COLUMN=${CAPTION_COLUMN:-TEXT}
mkdir -p "$RUNS"

# -- 0. shards ---------------------------------------------------------------------------------------
# Either with img2dataset (its webdataset output trains unchanged: KEY.jpg + KEY.txt + KEY.json, and
# NNNNN_stats.json gives the sample counts), e.g. CC3M (add the header line "caption<TAB>url" to the TSV):
#
#   img2dataset --url_list cc3m.tsv --input_format tsv --url_col url --caption_col caption \
#       --output_format webdataset --output_folder /data/cc3m --processes_count 16 --thread_count 64 \
#       --image_size 256 --resize_mode keep_ratio --number_sample_per_shard 10000 --enable_wandb False
#
# or a LAION/DataComp parquet of URLs:
#
#   img2dataset --url_list laion_part/ --input_format parquet --url_col URL --caption_col TEXT \
#       --save_additional_columns '["similarity","hash","punsafe"]' --output_format webdataset \
#       --output_folder /data/laion --processes_count 16 --thread_count 64 --image_size 256
#
# or with `mmpretrain prepare` (set PREPARE_URLS): the same member layout, plus a content-hash train/val
# split, sizes.json, stats.json and failures.jsonl (one line per URL that failed, with the reason), and
# re-running after a crash resumes. Its shards then are $OUT/train/*.tar and $OUT/val/*.tar.
if [ -n "$PREPARE_URLS" ]; then
    OUT=shards/$(basename "${PREPARE_URLS%.*}")
    mmpretrain prepare "$PREPARE_URLS" --out "$OUT" --image-column "$IMAGE_COLUMN" --caption-column "$CAPTION_COLUMN" \
        --image-size 256 --resize-mode keep_ratio --threads 64 --timeout 10 --retries 2 \
        --workers 16 --shard-size 10000 --val-fraction 0.002
    SHARDS=$OUT/train
    VAL_SHARDS=$OUT/val
fi

# -- 1. look before training ---------------------------------------------------------------------------
# Counts, image sizes, caption lengths, and a check of every shard (a tar without captions is named here,
# not found as a silent hang on 8 GPUs). Exit code 1 names the broken shard.
mmpretrain inspect "$SHARDS" --grid "$RUNS/contact.png"
mmpretrain inspect "$VAL_SHARDS"

# -- 2. train: CLIP + masked-LM + next-token (the text branch learns from the captions) ------------------
# Preempted or killed? Run the same command again: train.resume=latest continues from the newest
# checkpoint (every 1000 steps) with the same losses an uninterrupted run would have had; keep the same
# number of GPUs and data.num_workers. Add a text corpus with data.text_shards='["shards/corpus/train"]'.
accelerate launch --config_file "$ACCEL" -m mmpretrain.train --config configs/train/vit-b-32.yaml \
    data.train_shards="$SHARDS" eval.retrieval_shards="$VAL_SHARDS" \
    train.output_dir="$RUNS/vit-b-32" train.resume=latest

# -- 3. the baseline: the same recipe without the text branch (model.mlm=false model.ar=false) ----------
accelerate launch --config_file "$ACCEL" -m mmpretrain.train --config configs/train/vit-b-32-contrastive.yaml \
    data.train_shards="$SHARDS" eval.retrieval_shards="$VAL_SHARDS" \
    train.output_dir="$RUNS/vit-b-32-contrastive" train.resume=latest

# -- 4. evaluate both on the full held-out set (periodic eval used eval.max_samples=5000) --------------
# Under accelerate each GPU embeds its share; the metrics equal a one-process run.
EVAL=(accelerate launch --config_file "$ACCEL" -m mmpretrain eval)
for NAME in vit-b-32 vit-b-32-contrastive; do
    RUN=$RUNS/$NAME
    "${EVAL[@]}" retrieval --checkpoint "$RUN" --shards "$VAL_SHARDS" --precision bf16 --no-progress \
        --out "$RUN/retrieval.json" --report "$RUN/retrieval.png"
    if [ -n "$ZEROSHOT_SHARDS" ]; then   # e.g. ImageNet val: mmpretrain prepare imagenet/val --out shards/imagenet-val --val-fraction 0
        "${EVAL[@]}" zeroshot --checkpoint "$RUN" --shards "$ZEROSHOT_SHARDS" --precision bf16 --no-progress \
            ${CLASSNAMES:+--classnames "$CLASSNAMES"} --out "$RUN/zeroshot.json" --report "$RUN/zeroshot.png"
    fi
done
if [ -n "$TEXT_VAL" ]; then   # only the run with text heads has MLM accuracy / AR perplexity
    "${EVAL[@]}" text --checkpoint "$RUNS/vit-b-32" --shards "$TEXT_VAL" --precision bf16 --no-progress \
        --out "$RUNS/vit-b-32/text.json"
fi
# Side by side (the table and bars of pipelines/compare_objectives.sh; missing files read "—"):
python pipelines/compare_objectives.py "$RUNS" vit-b-32-contrastive vit-b-32
mmpretrain plot "$RUNS/vit-b-32"

# -- 5. export: open_clip's local-dir layout (+ the text heads, which open_clip ignores) -----------------
#   open_clip.create_model_and_transforms("local-dir:exported/vit-b-32") loads it.
mmpretrain export --checkpoint "$RUNS/vit-b-32" --out "exported/vit-b-32" --overwrite
mmpretrain export --checkpoint "$RUNS/vit-b-32-contrastive" --out "exported/vit-b-32-contrastive" --overwrite
