#!/usr/bin/env bash
# The mmpretrain quickstart — what `make demo` runs, readable as a tutorial.
#
#   pipelines/quickstart.sh [DEMO_DIR]        (default demo_run; needs the package installed: `make install`)
#
# 1. draw a small procedural image–caption collection and a text corpus (no download): the binding task,
#    one large shape on white whose caption names shape, colour and grid cell,
# 2. turn both into WebDataset shards with `mmpretrain prepare` (train/ and val/ split by content hash),
# 3. train the tiny multitask model (InfoNCE + masked-LM + next-token; configs/train/demo.yaml) with `accelerate launch`:
#    2 gloo processes on CPU, or one process per GPU when there are GPUs,
# 4. evaluate on the held-out split: image<->text retrieval, zero-shot classification, text metrics,
# 5. draw the report PNGs and the training curves.
# About 7 minutes on 2 CPU cores after the install; the README states the time and the numbers it reaches.
set -euo pipefail

DEMO=${1:-${DEMO:-demo_run}}
BIN=${BIN:-.venv/bin}                    # where `make install` put mmpretrain and accelerate
STEPS=${STEPS:-}                         # e.g. STEPS=200 for a quicker look (the config says 1200)
RUN=$DEMO/run
export PATH="$BIN:$PATH"
# Fewer differences between machines (README, "What varies between machines"): one thread per process (the
# trainer would size threads by the core count, and a different thread count sums in another order),
# and the AVX2 code paths of torch's CPU kernels and of MKL (an AVX-512 machine otherwise takes other
# kernels, which round differently). Each alone moves the loss in the 6th digit within 50 steps, and
# 1200 steps amplify that into points of R@1. Set them otherwise to use more of a bigger machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} MKL_CBWR=${MKL_CBWR:-AVX2}

echo "== 1. demo data -> $DEMO/raw"
mmpretrain demo-data --task binding --out "$DEMO/raw" > /dev/null

echo "== 2. shards: image-text (a caption folder and a CSV manifest with labels) and text-only"
mmpretrain prepare "$DEMO/raw/folder" "$DEMO/raw/manifest.csv" --out shards/demo --image-size 64 \
    --workers 2 --val-fraction 0.05 --shard-size 500 --no-progress
mmpretrain prepare "$DEMO/raw/corpus.txt" --text-only --out shards/demo-text --val-fraction 0.05 \
    --shard-size 500 --no-progress
mmpretrain inspect shards/demo --grid "$DEMO/contact.png" > /dev/null

echo "== 3. train the tiny model (configs/train/demo.yaml) -> $RUN"
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    LAUNCH=(accelerate launch --num_processes "$(nvidia-smi -L | wc -l)" --multi_gpu)
    [ "$(nvidia-smi -L | wc -l)" = 1 ] && LAUNCH=(accelerate launch --config_file configs/accelerate/1gpu.yaml)
else
    LAUNCH=(accelerate launch --config_file configs/accelerate/cpu-2proc.yaml)
fi
rm -rf "$RUN"                            # a fresh run each time (to continue one instead: train.resume=latest)
"${LAUNCH[@]}" -m mmpretrain.train --config configs/train/demo.yaml train.output_dir="$RUN" \
    eval.classnames="$DEMO/raw/classes.txt" ${STEPS:+train.steps=$STEPS}

echo "== 4. evaluate on held-out data"
mmpretrain eval retrieval --checkpoint "$RUN" --shards shards/demo/val --no-progress \
    --out "$DEMO/retrieval.json" --report "$DEMO/retrieval.png"
mmpretrain eval zeroshot --checkpoint "$RUN" --shards shards/demo/val --no-progress \
    --classnames "$DEMO/raw/classes.txt" --out "$DEMO/zeroshot.json" --report "$DEMO/zeroshot.png"
mmpretrain eval text --checkpoint "$RUN" --shards shards/demo-text/val --no-progress --out "$DEMO/text.json"

echo "== 5. curves and summary"
mmpretrain plot "$RUN" --out "$DEMO/curves.png"
"$BIN/python" pipelines/demo_summary.py "$DEMO"
