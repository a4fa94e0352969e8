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
# A name may add modifiers, each after a "+": mlm-ar+warmdown holds the text weights for half the run,
# then brings them down to 0 along a cosine (loss.text_weight_end=0 loss.text_weight_decay_from=0.5);
# mlm-ar+text8 gives the text batch 8 documents per process (data.text_batch_size=8); both combine
# (mlm-ar+text8+warmdown).
# Same budget: every run gets the same train.steps, image-text batch, text batch and seed, so the image
# side sees the same number of pairs; the runs with text heads also spend compute on a text batch per step.
# Equal wall-clock instead: BUDGET=SECONDS times CALIBRATE_STEPS steps of each objective first (a short
# run logged every step, under $OUT/.calibrate) and gives each run the steps that fit in SECONDS, so a
# slower objective trains fewer steps (its schedule still completes: warmup and cosine over its steps).
# SEEDS="0 1" repeats everything per seed (run folders NAME-sSEED); EXTRA="loss.ar_fraction=0.05 ..."
# adds overrides to every run (loss weights, fractions, batch shares; they are in each config.yaml).
#
# Output, under $OUT (default compare_runs):
#   NAME/                  the run directory (config.yaml, metrics.jsonl, checkpoints/); NAME-sSEED with SEEDS
#   NAME.steps             with BUDGET: the steps the calibration gave the run
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
SEEDS=${SEEDS:-${SEED:-0}}                      # one or more train.seed values
BUDGET=${BUDGET:-}                              # seconds of training per run (equal wall-clock); empty: STEPS
CALIBRATE_STEPS=${CALIBRATE_STEPS:-25}          # steps timed per objective for BUDGET
EXTRA=${EXTRA:-}                                # overrides added to every run
LOG_EVERY=${LOG_EVERY:-10}
IMAGE_SHARDS=${IMAGE_SHARDS:-shards/demo}       # a `prepare` output folder: train/ and val/ (labelled val)
TEXT_SHARDS=${TEXT_SHARDS:-shards/demo-text}    # a text-only `prepare` output folder: train/ and val/
CLASSNAMES=${CLASSNAMES-demo_run/raw/classes.txt}   # set to "" to use the shards' dataset.json
LAUNCH=${LAUNCH:-mmpretrain train}              # or: accelerate launch --config_file ... -m mmpretrain.train
EVAL_ARGS=${EVAL_ARGS:---no-progress}           # extra flags for every `mmpretrain eval`
read -ra LAUNCH_CMD <<< "$LAUNCH"
read -ra EVAL_EXTRA <<< "$EVAL_ARGS"
read -ra EXTRA_ARGS <<< "$EXTRA"
warmup() { echo "${WARMUP:-$(( $1 / 15 < 20 ? $1 / 15 : 20 ))}"; }   # tiny's 20 at 300 steps, less for fewer

# -- data: the demo shards, drawn here when they are missing (the same steps as pipelines/quickstart.sh) --
if [ ! -d "$IMAGE_SHARDS/train" ] || [ ! -d "$TEXT_SHARDS/train" ]; then
    if [ "$IMAGE_SHARDS" != shards/demo ] || [ "$TEXT_SHARDS" != shards/demo-text ]; then
        echo "compare_objectives: $IMAGE_SHARDS/train or $TEXT_SHARDS/train not found; prepare them first" \
             "(mmpretrain prepare ... --out $IMAGE_SHARDS), or unset IMAGE_SHARDS/TEXT_SHARDS for the demo" >&2
        exit 2
    fi
    echo "== demo shards not found: drawing them (or run \`make demo\` first)"
    mmpretrain demo-data --task binding --out demo_run/raw > /dev/null
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

objective_overrides() {   # the overrides that make objective $1: BASE[+MODIFIER...]
    local base=${1%%+*} args mods=() mod
    case "$base" in
        contrastive) args="model.mlm=false model.ar=false" ;;
        mlm)         args="model.ar=false" ;;
        ar)          args="model.mlm=false" ;;
        mlm-ar)      args="" ;;
        sop)         args="model.sentence_pair=sop" ;;
        *) echo "compare_objectives: unknown objective '$base' (contrastive mlm ar mlm-ar sop)" >&2; return 2 ;;
    esac
    [ "$base" != "$1" ] && IFS=+ read -ra mods <<< "${1#*+}"
    for mod in ${mods[@]+"${mods[@]}"}; do
        case "$mod" in
            warmdown)  args+=" loss.text_weight_end=0 loss.text_weight_decay_from=0.5" ;;
            text[0-9]*) args+=" data.text_batch_size=${mod#text}" ;;
            *) echo "compare_objectives: unknown modifier '$mod' in '$1' (warmdown, textN)" >&2; return 2 ;;
        esac
    done
    echo "$args"
}

train() {   # train NAME RUN STEPS SEED [overrides...]
    local name=$1 run=$2 steps=$3 seed=$4
    shift 4
    read -ra MODEL_ARGS <<< "$(objective_overrides "$name")"
    "${LAUNCH_CMD[@]}" --config "$CONFIG" \
        train.output_dir="$run" train.resume=latest train.steps="$steps" train.seed="$seed" \
        train.checkpoint_every=0 data.batch_size="$BATCH" data.text_batch_size="$TEXT_BATCH" \
        data.train_shards="$IMAGE_SHARDS/train" data.text_shards="$TEXT_SHARDS/train" \
        eval.every=0 logging.log_every="$LOG_EVERY" logging.trackers="[]" logging.progress=false \
        schedule.warmup_steps="$(warmup "$steps")" ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} \
        ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} "$@"
}

mkdir -p "$OUT"
RUNS=()
for SEED in $SEEDS; do
for NAME in $OBJECTIVES; do
    objective_overrides "$NAME" > /dev/null
    RUN_NAME=$NAME
    [ "$(wc -w <<< "$SEEDS")" -gt 1 ] && RUN_NAME=$NAME-s$SEED
    RUN=$OUT/$RUN_NAME
    RUNS+=("$RUN_NAME")
    [ "${FRESH:-0}" = 1 ] && rm -rf "$RUN" "$RUN.steps"
    RUN_STEPS=$STEPS
    if [ -n "$BUDGET" ]; then
        if [ -f "$RUN.steps" ]; then
            RUN_STEPS=$(cat "$RUN.steps")            # a resumed run keeps the steps it was given
        else
            CAL=$OUT/.calibrate/$RUN_NAME
            rm -rf "$CAL"
            echo "== time $NAME (seed $SEED): $CALIBRATE_STEPS steps"
            train "$NAME" "$CAL" "$CALIBRATE_STEPS" "$SEED" logging.log_every=1 > /dev/null 2>&1
            RUN_STEPS=$("$BIN/python" pipelines/compare_objectives.py "$OUT/.calibrate" "$RUN_NAME" \
                --steps-for-budget "$BUDGET")
            rm -rf "$CAL"
            echo "$RUN_STEPS" > "$RUN.steps"
        fi
    fi
    echo "== train $NAME (seed $SEED, $RUN_STEPS steps) -> $RUN"
    train "$NAME" "$RUN" "$RUN_STEPS" "$SEED"

    echo "== evaluate $RUN_NAME"
    mmpretrain eval retrieval --checkpoint "$RUN" --shards "$IMAGE_SHARDS/val" "${EVAL_EXTRA[@]}" \
        --out "$RUN/retrieval.json" > /dev/null
    mmpretrain eval zeroshot --checkpoint "$RUN" --shards "$IMAGE_SHARDS/val" "${EVAL_EXTRA[@]}" \
        ${CLASSNAME_ARGS[@]+"${CLASSNAME_ARGS[@]}"} --out "$RUN/zeroshot.json" > /dev/null
    if [ "${NAME%%+*}" != contrastive ]; then   # the only objective without a text head
        mmpretrain eval text --checkpoint "$RUN" --shards "$TEXT_SHARDS/val" "${EVAL_EXTRA[@]}" \
            --seed "$SEED" --out "$RUN/text.json" > /dev/null
    else
        rm -f "$RUN/text.json"
    fi
done
done
rm -rf "$OUT/.calibrate"

echo "== comparison -> $OUT/comparison.md, $OUT/comparison.png"
"$BIN/python" pipelines/compare_objectives.py "$OUT" "${RUNS[@]}"
