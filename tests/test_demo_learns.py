"""The quickstart's path, shrunk: demo data -> prepare -> the tiny multitask model -> held-out retrieval.
Learning must happen: the contrastive loss falls and held-out R@1 reaches 5x chance."""

from __future__ import annotations

import json
from pathlib import Path

from mmpretrain.cli import main
from mmpretrain.config import load_config
from mmpretrain.prepare.demo import generate_demo_data

ROOT = Path(__file__).resolve().parents[1]
STEPS = 100  # a seed-sized margin: at 60 steps held-out R@1 sits near 5x chance, on either side of it


def test_tiny_model_learns_on_the_demo_data(tmp_path):
    from mmpretrain.eval.evaluator import EvalSettings, Evaluator
    from mmpretrain.train.trainer import Trainer

    raw, shards = tmp_path / "raw", tmp_path / "shards"
    generate_demo_data(raw, num_images=800, image_size=64, seed=0, num_documents=200)
    assert main(["prepare", str(raw / "folder"), str(raw / "manifest.csv"), "--out", str(shards), "--image-size",
                 "64", "--workers", "1", "--val-fraction", "0.15", "--shard-size", "300", "--no-progress"]) == 0
    cfg = load_config(ROOT / "configs" / "train" / "tiny.yaml", [
        f"data.train_shards={shards}/train", "data.text_shards=[]", "data.text_batch_size=16", "data.num_workers=1",
        f"train.steps={STEPS}", "train.checkpoint_every=0", "schedule.warmup_steps=10", "eval.every=0",
        f"train.output_dir={tmp_path / 'run'}", "logging.log_every=1", "logging.trackers=[]",
        "logging.progress=false",
    ])
    trainer = Trainer(cfg)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    clip = [r["clip_loss"] for r in rows if r["kind"] == "train"]
    assert len(clip) == STEPS
    first, last = sum(clip[:10]) / 10, sum(clip[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"] and rows[-1]["ar_loss"] < rows[0]["ar_loss"]

    model = trainer.bare_model.eval()
    evaluator = Evaluator(model, trainer.model_cfg, settings=EvalSettings(batch_size=128, num_workers=0,
                                                                          progress=False))
    metrics = evaluator.retrieval([str(shards / "val")]).metrics
    chance = 1 / metrics["num_images"]
    assert metrics["num_images"] >= 80  # a held-out set big enough for chance to be small
    assert metrics["text_to_image_R@1"] >= 5 * chance, metrics
    assert metrics["image_to_text_R@1"] >= 5 * chance, metrics
