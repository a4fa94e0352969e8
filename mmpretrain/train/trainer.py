"""The training loop: `mmpretrain train --config X.yaml [section.key=value ...]`, the same code under
`accelerate launch -m mmpretrain.train ...` on any number of processes.

Per optimizer step: K = train.accum_steps image-text micro-batches (and, with text shards, K text
micro-batches) → `accumulate_step` (exact contrastive accumulation, every head used) → gradient
clipping → AdamW → schedule → temperature clamp. The loaders are built from the process's rank and
world size and are NOT passed to `accelerator.prepare` (see mmpretrain.data.loader). Every step's
metrics are averaged over processes in one collective, which also makes a non-finite loss stop every
process at the same step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mmpretrain import runtime
from mmpretrain.checkpoint.meta import checkpoint_meta
from mmpretrain.checkpoint.state import find_resume, load_checkpoint, save_checkpoint
from mmpretrain.config import Config, config_to_dict, require_training_data, save_config
from mmpretrain.data.loader import Loader, TextBranch, image_text_loader, text_loader
from mmpretrain.data.stream import StreamConfig
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.data.transforms import image_transforms
from mmpretrain.errors import UserError
from mmpretrain.eval import DEFAULT_TEMPLATES, load_classnames, load_templates
from mmpretrain.eval.evaluator import EvalSettings, Evaluator
from mmpretrain.eval.zeroshot import classnames_from_shards
from mmpretrain.models import TowerOptions, build_model, load_model_config, load_open_clip_weights
from mmpretrain.models.heads import Heads
from mmpretrain.models.model_config import image_size
from mmpretrain.shards.resolve import ShardSource, resolve
from mmpretrain.train.optim import build_optimizer, build_scheduler
from mmpretrain.train.runlog import RunLog, check_trackers
from mmpretrain.train.step import accumulate_step

SIGLIP_INIT_BIAS = -10.0  # Zhai et al. 2023


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the run stops before the bad update reaches a checkpoint."""


def make_accelerator(cfg: Config):
    check_trackers(cfg.logging.trackers)
    return runtime.make_accelerator(cfg.train.precision, log_with=cfg.logging.trackers,
                                    project_dir=cfg.train.output_dir)


class Trainer:
    """Model, optimizer and schedule on construction; `fit()` adds data, checkpoints, logging, eval."""

    def __init__(self, cfg: Config, accelerator=None):
        from accelerate.utils import DistributedType, set_seed

        self.cfg = cfg
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        set_seed(cfg.train.seed)  # the same initial weights on every process
        if acc.device.type == "cpu":
            runtime.share_cpu_cores(acc.num_processes, cfg.data.num_workers)
        self.model_cfg = load_model_config(cfg.model.name)
        context = self.model_cfg["text_cfg"].get("context_length", 77)
        if cfg.data.context_length > context:
            raise UserError(f"data.context_length = {cfg.data.context_length} exceeds the model's text context "
                            f"({context} in {cfg.model.name}); lower it")
        self.heads = Heads(mlm=cfg.model.mlm, ar=cfg.model.ar, sentence_pair=cfg.model.sentence_pair is not None)
        model = build_model(self.model_cfg, self._tower_options(), mlm=self.heads.mlm, ar=self.heads.ar,
                            sentence_pair=self.heads.sentence_pair)
        if cfg.model.pretrained:
            load_open_clip_weights(model.tower, cfg.model.pretrained)
            model.clamp_logit_scale_()
        optimizer = build_optimizer(model, cfg.optim, acc.device)
        # Not prepared by accelerate: its scheduler wrapper steps once per process per call; ours counts
        # optimizer steps. Registered so that save_state/load_state keep its position.
        self.scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.steps)
        if cfg.model.compile:
            model = torch.compile(model)
        if acc.distributed_type == DistributedType.DEEPSPEED and cfg.train.accum_steps > 1:
            raise UserError("train.accum_steps > 1 with DeepSpeed: its engine steps the optimizer inside "
                            "backward, which breaks exact contrastive accumulation; use DDP or FSDP, or accum_steps=1")
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.step = 0

    def _tower_options(self) -> TowerOptions:
        m = self.cfg.model
        return TowerOptions(
            patch_dropout=m.patch_dropout, lock_image=m.lock_image, lock_image_unlocked_groups=m.lock_image_unlocked_groups,
            grad_checkpointing=m.grad_checkpointing,
            init_logit_bias=SIGLIP_INIT_BIAS if self.cfg.loss.contrastive == "siglip" else None,
        )

    @property
    def bare_model(self):
        return self.accelerator.unwrap_model(self.model)

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """Forward/backward over the micro-batches, clip, update; metrics averaged over processes."""
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        local = accumulate_step(self.model, micro_batches, cfg.loss, backward=acc.backward,
                                no_sync=lambda: acc.no_sync(self.model))
        metrics = self._mean_over_processes(local)
        if not math.isfinite(metrics["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            parts = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.endswith("_loss"))
            raise TrainingDiverged(f"step {self.step + 1}: the loss is {metrics['loss']} ({parts}); stopped before "
                                   f"updating the weights. {self._last_good()} Lower optim.lr, raise "
                                   "schedule.warmup_steps or use train.precision=fp32/bf16, then resume")
        if cfg.optim.grad_clip is not None:
            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            if norm is not None:  # DeepSpeed clips inside its engine (gradient_clipping) and may return None
                metrics["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bare_model.clamp_logit_scale_()
        self.step += 1
        metrics["lr"] = lr
        return metrics

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        return runtime.mean_over_processes(values, self.accelerator.device)

    def _last_good(self) -> str:
        from mmpretrain.checkpoint.layout import latest_checkpoint

        last = latest_checkpoint(self.cfg.train.output_dir)
        return f"The last good checkpoint is {last}." if last else "No checkpoint was written yet."

    # -- the run -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to train.steps (resuming first when asked); returns the last step's metrics."""
        cfg, acc = self.cfg, self.accelerator
        require_training_data(cfg)
        run_dir = Path(cfg.train.output_dir)
        resume = find_resume(cfg.train.resume, run_dir)
        loaders = self.build_loaders()
        zeroshot_names = self._zeroshot_setup()
        if resume is not None:
            self.step = load_checkpoint(acc, resume, loaders)["step"]
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        acc.wait_for_everyone()
        log = RunLog(acc, run_dir, cfg.logging.project, config_to_dict(cfg), cfg.logging.trackers)
        try:
            return self._loop(loaders, log, zeroshot_names, resumed_from=resume)
        finally:
            log.close()

    def _loop(self, loaders: dict[str, Loader], log: RunLog, zeroshot_names, resumed_from) -> dict[str, Any]:
        cfg, acc, k = self.cfg, self.accelerator, self.cfg.train.accum_steps
        streams = {name: loader.forever() for name, loader in loaders.items()}
        per_step = cfg.data.batch_size * k * acc.num_processes  # image-text pairs per optimizer step
        bar = tqdm(total=cfg.train.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (acc.is_main_process and cfg.logging.progress))
        if resumed_from is not None and acc.is_main_process:
            bar.write(f"resumed from {resumed_from} at step {self.step}")
        metrics: dict[str, Any] = {}
        while self.step < cfg.train.steps:
            started = time.perf_counter()
            batches = {name: [next(stream) for _ in range(k)] for name, stream in streams.items()}
            waited = time.perf_counter() - started
            micro = [self._to_device(batches["image_text"][i], batches["text"][i] if "text" in batches else None)
                     for i in range(k)]
            metrics = self.train_step(micro)
            elapsed = time.perf_counter() - started
            last = self.step == cfg.train.steps
            if self.step % cfg.logging.log_every == 0 or last:
                # timing and skip counts cross processes on logged steps only: no extra collective per step
                metrics.update(self._throughput(loaders, per_step, elapsed, waited))
                log.write("train", self.step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{per_step / max(elapsed, 1e-9):.0f}")
            if (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0) or last:
                save_checkpoint(acc, cfg.train.output_dir, self.step, self._meta(), loaders,
                                cfg.train.keep_checkpoints, self.model)
            if cfg.eval.every and (self.step % cfg.eval.every == 0 or last):
                results = self.evaluate(zeroshot_names)
                if results:
                    log.write("eval", self.step, results)
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        bar.close()
        return metrics

    def _throughput(self, loaders: dict[str, Loader], per_step: int, elapsed: float, waited: float) -> dict[str, float]:
        skipped = sum(sum(loader.skipped.values()) for loader in loaders.values())
        shared = self._mean_over_processes({"wait": waited, "elapsed": elapsed, "skipped": skipped})
        return {
            "samples_per_s": per_step / max(shared["elapsed"], 1e-9),
            "data_wait": shared["wait"] / max(shared["elapsed"], 1e-9),  # fraction of the step spent waiting
            "skipped": round(shared["skipped"] * self.accelerator.num_processes),  # so far, all processes
            "epoch": self.step * self.cfg.train.accum_steps / len(loaders["image_text"]),
        }

    def _meta(self) -> dict[str, Any]:
        return checkpoint_meta(self.step, self.model_cfg, self.heads, config_to_dict(self.cfg))

    def _to_device(self, image_text: dict, text: dict | None) -> dict:
        device = self.accelerator.device
        out = {k: image_text[k].to(device, non_blocking=True) for k in ("images", "tokens", "eot_index")}
        text = text if text is not None else image_text.get("text")
        if text is not None and self.heads.any():
            out["text"] = {k: v.to(device, non_blocking=True) for k, v in text.items() if isinstance(v, torch.Tensor)}
        return out

    # -- data --------------------------------------------------------------------------------------
    def build_loaders(self) -> dict[str, Loader]:
        cfg, acc = self.cfg, self.accelerator
        d = cfg.data
        weights = d.train_weights or [1.0] * len(d.train_shards)
        stream = StreamConfig(shards=tuple(ShardSource(p, w) for p, w in zip(d.train_shards, weights)),
                              batch_size=d.batch_size, mode=d.mode, seed=cfg.train.seed,
                              shuffle_buffer=d.shuffle_buffer, samples_per_epoch=d.samples_per_epoch)
        tokenizer = Tokenizer(context_length=d.context_length)
        branch = TextBranch(cfg.data.masking, cfg.model.sentence_pair) if self.heads.any() else None
        transform = image_transforms(image_size(self.model_cfg), train=True, augmentation=d.augmentation or None)
        loaders = {"image_text": image_text_loader(
            stream, tokenizer=tokenizer, transform=transform, rank=acc.process_index, world=acc.num_processes,
            num_workers=d.num_workers, text_branch=None if d.text_shards else branch,
            pin_memory=acc.device.type == "cuda")}
        if d.text_shards and branch is not None:
            text_stream = StreamConfig(shards=tuple(ShardSource(p) for p in d.text_shards), batch_size=d.text_batch_size,
                                       mode=d.mode, seed=cfg.train.seed + 1, shuffle_buffer=d.shuffle_buffer)
            loaders["text"] = text_loader(text_stream, tokenizer=tokenizer, text_branch=branch, rank=acc.process_index,
                                          world=acc.num_processes, num_workers=d.num_workers)
        return loaders

    # -- periodic evaluation -----------------------------------------------------------------------
    def _zeroshot_setup(self) -> tuple[list[str], list[str]] | None:
        """Class names and templates, checked before the first step rather than at the first evaluation."""
        e = self.cfg.eval
        if not (e.every and e.zeroshot_shards):
            return None
        names = load_classnames(e.classnames) if e.classnames else classnames_from_shards(e.zeroshot_shards)
        return names, (load_templates(e.templates) if e.templates else list(DEFAULT_TEMPLATES))

    def evaluate(self, zeroshot: tuple[list[str], list[str]] | None = None) -> dict[str, float]:
        """The configured evaluations on the current weights; scalars named task/metric (main process)."""
        e, acc = self.cfg.eval, self.accelerator
        model = self.bare_model
        model.eval()
        settings = EvalSettings(batch_size=e.batch_size, num_workers=self.cfg.data.num_workers, progress=False)
        evaluator = Evaluator(model, self.model_cfg, device=acc.device, settings=settings, autocast=acc.autocast)
        results: dict[str, float] = {}
        try:
            if e.retrieval_shards:
                done = evaluator.retrieval(limit_shards(e.retrieval_shards, e.max_samples))
                results.update(_scalars("retrieval", done[0] if done else {}))
            if zeroshot is not None:
                done = evaluator.zeroshot(limit_shards(e.zeroshot_shards, e.max_samples), *zeroshot)
                results.update(_scalars("zeroshot", done[0] if done else {}))
            if e.text_shards and (self.heads.mlm or self.heads.ar):
                done = evaluator.text(limit_shards(e.text_shards, e.max_samples), seed=self.cfg.train.seed)
                results.update(_scalars("text", done or {}))
        finally:
            model.train()
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
