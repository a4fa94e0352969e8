"""The quickstart's closing table: held-out results against chance, and how training went.

    python pipelines/demo_summary.py DEMO_DIR      (reads DEMO_DIR/{retrieval,zeroshot,text}.json, DEMO_DIR/run)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmpretrain.table import format_table


def summary_rows(demo: Path) -> list[list]:
    retrieval = json.loads((demo / "retrieval.json").read_text())["metrics"]
    zeroshot = json.loads((demo / "zeroshot.json").read_text())["metrics"]
    text = json.loads((demo / "text.json").read_text())["metrics"]
    images, texts = retrieval["num_images"], retrieval["num_texts"]
    rows = []
    for k in (1, 5, 10):
        chance = min(1.0, k / images)  # one right image among `images`
        value = retrieval[f"text_to_image_R@{k}"]
        rows.append([f"text → image R@{k}", pct(value), pct(chance), f"{value / chance:.1f}×"])
    i2t_chance = (texts / images) / texts  # an image's captions (texts / images on average) among all texts
    value = retrieval["image_to_text_R@1"]
    rows.append(["image → text R@1", pct(value), pct(i2t_chance), f"{value / i2t_chance:.1f}×"])
    chance = 1 / zeroshot["num_classes"]
    rows.append(["zero-shot top-1", pct(zeroshot["acc1"]), pct(chance), f"{zeroshot['acc1'] / chance:.1f}×"])
    if "mlm_accuracy" in text:
        rows.append(["MLM accuracy (masked tokens)", pct(text["mlm_accuracy"]), "", ""])
    if "ar_perplexity" in text:
        rows.append(["AR perplexity (vocab 49410)", f"{text['ar_perplexity']:.1f}", "49410", ""])
    return rows


def training_line(run: Path) -> str:
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip().startswith("{")]
    train = [s for s in steps if s.get("kind") == "train"]
    if not train:
        return "no training steps logged"
    first, last = train[0], train[-1]
    return (f"training: {last['step']} steps, loss {first['loss']:.3f} -> {last['loss']:.3f} "
            f"(contrastive {first.get('clip_loss', float('nan')):.3f} -> {last.get('clip_loss', float('nan')):.3f}), "
            f"{last['samples_per_s']:.0f} image-text pairs/s at the end")


def pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def main(argv: list[str]) -> int:
    demo = Path(argv[0] if argv else "demo_run")
    print(format_table(["held-out metric", "value", "chance", "vs chance"], summary_rows(demo)))
    print(training_line(demo / "run"))
    print(f"reports: {demo}/retrieval.png {demo}/zeroshot.png {demo}/curves.png; JSON: {demo}/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
