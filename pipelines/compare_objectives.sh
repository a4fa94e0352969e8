#!/usr/bin/env bash
# Which text objective helps? Train the tiny model five times under the same budget, evaluate each run
# on the same held-out data, and put the numbers side by side.
#
#   pipelines/compare_objectives.sh      (from the repository root; needs the package installed: `make install`)
#   STEPS=100 OUT=runs/compare pipelines/compare_objectives.sh
#   LAUNCH="accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m mmpretrain.train" \
#       pipelines/compare_objectives.sh
#
# The five objectives (model.* overrides on configs/train/tiny.yaml):
#   contrastive   InfoNCE only                  model.mlm=false model.ar=false
#   mlm           + masked-LM                   model.ar=false
#   ar            + next-token (AR)             model.mlm=false
#   mlm-ar        + masked-LM + next-token      (the tiny recipe as it is)
#   sop           + MLM + AR + sentence order   model.sentence_pair=sop
# Same budget: every run gets the same train.steps, image-text batch, text batch and seed, so the image
# side sees the same number of pairs; the runs with text heads also spend compute on a text batch per step.
#
# Output, under $OUT (default compare_runs):
#   NAME/                  the run directory (config.yaml, metrics.jsonl, checkpoints/)
#   NAME/retrieval.json    mmpretrain eval retrieval on $IMAGE_SHARDS/val
#   NAME/zeroshot.json     mmpretrain eval zeroshot on $IMAGE_SHARDS/val with $CLASSNAMES
#   NAME/text.json         mmpretrain eval text on $TEXT_SHARDS/val (runs with a text head; the
#                          contrastive-only run has none, so its text columns read "—")
#   comparison.md          one table: final train loss parts, retrieval R@1 both ways, zero-shot top-1,
#                          MLM accuracy, AR perplexity, samples/s (also printed)
#   comparison.png         the same numbers as bars, one panel per metric
#
# Re-running continues: each run resumes from its newest checkpoint (train.resume=latest), so a finished
# run is not trained again and a killed one picks up where it stopped. FRESH=1 deletes $OUT/NAME first.
# With the defaults (300 steps each) expect roughly half an hour on 2 CPU cores.
set -euo pipefail

BIN=${BIN:-.venv/bin}                           # where `make install` put mmpretrain and accelerate
export PATH="$BIN:$PATH"
OUT=${OUT:-compare_runs}
CONFIG=${CONFIG:-configs/train/tiny.yaml}
OBJECTIVES=${OBJECTIVES:-contrastive mlm ar mlm-ar sop}   # a subset or another order works too
STEPS=${STEPS:-300}                             # optimizer steps per run
BATCH=${BATCH:-32}                              # image-text pairs per process per step
TEXT_BATCH=${TEXT_BATCH:-$BATCH}                # text documents per process per step (text heads only)
SEED=${SEED:-0}
WARMUP=${WARMUP:-$(( STEPS / 15 < 20 ? STEPS / 15 : 20 ))}   # schedule.warmup_steps: tiny's 20 at 300 steps, less for fewer
LOG_EVERY=${LOG_EVERY:-10}
IMAGE_SHARDS=${IMAGE_SHARDS:-shards/demo}       # a `prepare` output folder: train/ and val/ (labelled val)
TEXT_SHARDS=${TEXT_SHARDS:-shards/demo-text}    # a text-only `prepare` output folder: train/ and val/
CLASSNAMES=${CLASSNAMES-demo_run/raw/classes.txt}   # set to "" to use the shards' dataset.json
LAUNCH=${LAUNCH:-mmpretrain train}              # or: accelerate launch --config_file ... -m mmpretrain.train
EVAL_ARGS=${EVAL_ARGS:---no-progress}           # extra flags for every `mmpretrain eval`
read -ra LAUNCH_CMD <<< "$LAUNCH"
read -ra EVAL_EXTRA <<< "$EVAL_ARGS"

# -- data: the demo shards, drawn here when they are missing (the same steps as pipelines/quickstart.sh) --
if [ ! -d "$IMAGE_SHARDS/train" ] || [ ! -d "$TEXT_SHARDS/train" ]; then
    if [ "$IMAGE_SHARDS" != shards/demo ] || [ "$TEXT_SHARDS" != shards/demo-text ]; then
        echo "compare_objectives: $IMAGE_SHARDS/train or $TEXT_SHARDS/train not found; prepare them first" \
             "(mmpretrain prepare ... --out $IMAGE_SHARDS), or unset IMAGE_SHARDS/TEXT_SHARDS for the demo" >&2
        exit 2
    fi
    echo "== demo shards not found: drawing them (or run \`make demo\` first)"
    mmpretrain demo-data --out demo_run/raw > /dev/null
    mmpretrain prepare demo_run/raw/folder demo_run/raw/manifest.csv --out shards/demo --image-size 64 \
        --workers 2 --val-fraction 0.05 --shard-size 500 --no-progress
    mmpretrain prepare demo_run/raw/corpus.txt --text-only --out shards/demo-text --val-fraction 0.05 \
        --shard-size 500 --no-progress
fi
CLASSNAME_ARGS=()
if [ -n "$CLASSNAMES" ]; then
    [ -f "$CLASSNAMES" ] || { echo "compare_objectives: CLASSNAMES=$CLASSNAMES not found" >&2; exit 2; }
    CLASSNAME_ARGS=(--classnames "$CLASSNAMES")
fi

objective_overrides() {   # the model.* overrides that make objective $1
    case "$1" in
        contrastive) echo "model.mlm=false model.ar=false" ;;
        mlm)         echo "model.ar=false" ;;
        ar)          echo "model.mlm=false" ;;
        mlm-ar)      echo "" ;;
        sop)         echo "model.sentence_pair=sop" ;;
        *) echo "compare_objectives: unknown objective '$1' (contrastive mlm ar mlm-ar sop)" >&2; return 2 ;;
    esac
}

mkdir -p "$OUT"
for NAME in $OBJECTIVES; do
    read -ra MODEL_ARGS <<< "$(objective_overrides "$NAME")"
    RUN=$OUT/$NAME
    [ "${FRESH:-0}" = 1 ] && rm -rf "$RUN"
    echo "== train $NAME -> $RUN (${MODEL_ARGS[*]:-both text heads, as configured})"
    "${LAUNCH_CMD[@]}" --config "$CONFIG" ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} \
        train.output_dir="$RUN" train.resume=latest train.steps="$STEPS" train.seed="$SEED" \
        train.checkpoint_every=0 data.batch_size="$BATCH" data.text_batch_size="$TEXT_BATCH" \
        data.train_shards="$IMAGE_SHARDS/train" data.text_shards="$TEXT_SHARDS/train" \
        eval.every=0 logging.log_every="$LOG_EVERY" logging.trackers="[]" logging.progress=false \
        schedule.warmup_steps="$WARMUP"

    echo "== evaluate $NAME"
    mmpretrain eval retrieval --checkpoint "$RUN" --shards "$IMAGE_SHARDS/val" "${EVAL_EXTRA[@]}" \
        --out "$RUN/retrieval.json" > /dev/null
    mmpretrain eval zeroshot --checkpoint "$RUN" --shards "$IMAGE_SHARDS/val" "${EVAL_EXTRA[@]}" \
        ${CLASSNAME_ARGS[@]+"${CLASSNAME_ARGS[@]}"} --out "$RUN/zeroshot.json" > /dev/null
    if [ "$NAME" != contrastive ]; then   # the only objective without a text head
        mmpretrain eval text --checkpoint "$RUN" --shards "$TEXT_SHARDS/val" "${EVAL_EXTRA[@]}" \
            --seed "$SEED" --out "$RUN/text.json" > /dev/null
    else
        rm -f "$RUN/text.json"
    fi
done

echo "== comparison -> $OUT/comparison.md, $OUT/comparison.png"
# shellcheck disable=SC2086  # OBJECTIVES is a word list on purpose
"$BIN/python" pipelines/compare_objectives.py "$OUT" $OBJECTIVES
