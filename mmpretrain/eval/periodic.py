"""Evaluation during training: the `eval` section of a training config, run on the current weights.

Set up before the first step (class names and templates are read then, so a bad path fails in
seconds, not at the first evaluation) and run every `eval.every` steps by the trainer. Results are
scalars named `task/metric` (retrieval/text_to_image_R@1, zeroshot/acc1, text/mlm_accuracy, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmpretrain.config import EvalConfig
from mmpretrain.eval.evaluator import EvalSettings, Evaluator
from mmpretrain.eval.zeroshot import Prompts, zeroshot_prompts
from mmpretrain.models.heads import Heads
from mmpretrain.shards.resolve import ShardSource, resolve


class PeriodicEval:
    def __init__(self, cfg: EvalConfig, *, heads: Heads, model_config: dict[str, Any], num_workers: int,
                 seed: int):
        self.cfg, self.heads, self.model_config, self.seed = cfg, heads, model_config, seed
        self.settings = EvalSettings(batch_size=cfg.batch_size, num_workers=num_workers, progress=False)
        self.zeroshot: Prompts | None = None
        if cfg.every and cfg.zeroshot_shards:
            self.zeroshot = zeroshot_prompts(cfg.classnames, cfg.templates, cfg.zeroshot_shards)

    def due(self, step: int, last: bool) -> bool:
        return bool(self.cfg.every) and (step % self.cfg.every == 0 or last)

    def run(self, model: torch.nn.Module, device: torch.device, autocast: Callable) -> dict[str, float]:
        """Every configured evaluation of `model` (a bare MultitaskModel with all of its weights on this
        process); collective, the same scalars come back on every process."""
        e = self.cfg
        evaluator = Evaluator(model, self.model_config, device=device, settings=self.settings, autocast=autocast)
        results: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            if e.retrieval_shards:
                done = evaluator.retrieval(limit_shards(e.retrieval_shards, e.max_samples),
                                           positives=e.retrieval_positives)
                results.update(_scalars("retrieval", done.metrics))
            if self.zeroshot is not None:
                done = evaluator.zeroshot(limit_shards(e.zeroshot_shards, e.max_samples),
                                          self.zeroshot.classnames, self.zeroshot.templates)
                results.update(_scalars("zeroshot", done.metrics))
            if e.text_shards and (self.heads.mlm or self.heads.ar):
                done = evaluator.text(limit_shards(e.text_shards, e.max_samples), seed=self.seed)
                results.update(_scalars("text", done.metrics))
        finally:
            model.train(was_training)
        return results


def limit_shards(patterns: list[str], max_samples: int | None) -> list[str]:
    """The first shards (in pattern order) that hold at least `max_samples` samples; all when None.
    Whole shards, so the evaluated set is the same for any number of processes."""
    if max_samples is None:
        return list(patterns)
    chosen, total = [], 0
    for shard in resolve([ShardSource(p) for p in patterns], need_sizes=True):
        chosen.append(shard.url)
        total += shard.size
        if total >= max_samples:
            break
    return chosen


def _scalars(task: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{task}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
