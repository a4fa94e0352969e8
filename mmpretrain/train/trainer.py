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

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mmpretrain import runtime
from mmpretrain.checkpoint.meta import checkpoint_meta
from mmpretrain.checkpoint.state import find_resume, load_checkpoint, save_checkpoint
from mmpretrain.config import Config, config_to_dict, require_training_data, save_config, sections_off
from mmpretrain.data.loader import Loader, TextBranch, build_train_loaders
from mmpretrain.data.records import ImageTextBatch, TextBatch
from mmpretrain.errors import UserError
from mmpretrain.eval.periodic import PeriodicEval
from mmpretrain.losses.objective import scheduled
from mmpretrain.losses.siglip import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from mmpretrain.models import TowerOptions, build_model, load_model_config, load_open_clip_weights
from mmpretrain.models.heads import Heads
from mmpretrain.models.model_config import image_size
from mmpretrain.train.guard import exit_with_launcher, hold_run_folder
from mmpretrain.train.open_clip_train import continue_open_clip_train
from mmpretrain.train.optim import build_optimizer, build_scheduler, seek_scheduler
from mmpretrain.train.runlog import RunLog, check_trackers
from mmpretrain.train.step import accumulate_step


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

        exit_with_launcher()  # before the rendezvous, which would wait for a dead launcher's store
        self.cfg = cfg
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        set_seed(cfg.train.seed)  # the same initial weights on every process
        if acc.device.type == "cpu":
            runtime.share_cpu_cores(acc.num_processes, cfg.data.num_workers)
            runtime.keep_freed_memory()  # no page faults for the per-step (V, D) gradients
        self.model_cfg = load_model_config(cfg.model.name)
        context = self.model_cfg["text_cfg"].get("context_length", 77)
        if cfg.data.context_length > context:
            raise UserError(f"data.context_length = {cfg.data.context_length} exceeds the model's text context "
                            f"({context} in {cfg.model.name}); lower it")
        self.heads = Heads.of(cfg.model)
        model = build_model(self.model_cfg, self._tower_options(), heads=self.heads)
        if cfg.model.pretrained:
            load_open_clip_weights(model.tower, cfg.model.pretrained)
            model.clamp_logit_scale_()
        optimizer = build_optimizer(model, cfg.optim, acc.device)
        # Not prepared by accelerate: its scheduler wrapper steps once per process per call; ours counts
        # optimizer steps. Checkpoints keep its position (scheduler.json, mmpretrain.checkpoint.state).
        self.scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.steps)
        if cfg.model.compile:
            model = torch.compile(model)
        if acc.distributed_type == DistributedType.DEEPSPEED and cfg.train.accum_steps > 1:
            raise UserError("train.accum_steps > 1 with DeepSpeed: its engine steps the optimizer inside "
                            "backward, which breaks exact contrastive accumulation; use DDP or FSDP, or accum_steps=1")
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step = 0

    def _tower_options(self) -> TowerOptions:
        m, siglip = self.cfg.model, self.cfg.loss.contrastive == "siglip"
        return TowerOptions(
            patch_dropout=m.patch_dropout, lock_image=m.lock_image, lock_image_unlocked_groups=m.lock_image_unlocked_groups,
            grad_checkpointing=m.grad_checkpointing,
            init_logit_bias=SIGLIP_INIT_LOGIT_BIAS if siglip else None,
            init_logit_scale=SIGLIP_INIT_LOGIT_SCALE if siglip else None,
        )

    @property
    def bare_model(self):
        return self.accelerator.unwrap_model(self.model)

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self, micro_batches: list[ImageTextBatch]) -> dict[str, float]:
        """Forward/backward over the micro-batches, clip, update; metrics averaged over processes."""
        acc, cfg = self.accelerator, self.cfg
        self.model.train()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        loss_cfg, text_weight = scheduled(cfg.loss, self.step, cfg.train.steps)  # loss.text_weight_end
        local = accumulate_step(self.model, micro_batches, loss_cfg, backward=acc.backward,
                                no_sync=lambda: acc.no_sync(self.model))
        metrics = self._mean_over_processes(local)
        if cfg.loss.text_weight_end != 1.0:
            metrics["text_weight"] = text_weight
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
        """Train to train.steps (resuming first when asked); returns the last step's metrics. The run
        folder is locked for the whole run, before anything reads it (one writer; guard.py)."""
        require_training_data(self.cfg)
        run_dir = Path(self.cfg.train.output_dir)
        with hold_run_folder(run_dir, self.accelerator.is_main_process):
            return self._fit(run_dir)

    def _fit(self, run_dir: Path) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        resume = find_resume(cfg.train.resume, run_dir)
        loaders = self.build_loaders()
        self.periodic = PeriodicEval(cfg.eval, heads=self.heads, model_config=self.model_cfg,
                                     num_workers=cfg.data.num_workers, seed=cfg.train.seed)
        if resume is not None and resume.is_file():  # an open_clip_train epoch_N.pt
            self._continue_open_clip_train(resume)
        elif resume is not None:
            self.step = load_checkpoint(acc, resume, loaders, model=self.model, optimizer=self.optimizer,
                                        scheduler=self.scheduler)["step"]
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            for what in sections_off(cfg):
                print(f"mmpretrain train: off: {what}", flush=True)  # stdout: stderr is for what went wrong
        acc.wait_for_everyone()
        log = RunLog(acc, run_dir, cfg.logging.project, config_to_dict(cfg), cfg.logging.trackers)
        try:
            return self._loop(loaders, log, resumed_from=resume)
        finally:
            log.close()

    def _continue_open_clip_train(self, path: Path) -> None:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise UserError(f"train.resume={path}: an open_clip_train checkpoint continues under DDP or one "
                            "process; under FSDP/DeepSpeed start from its weights with model.pretrained")
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper holds torch's AdamW
        self.step, notes = continue_open_clip_train(path, self.bare_model, inner)
        seek_scheduler(self.scheduler, self.step)
        if self.accelerator.is_main_process:
            for note in notes:
                print(f"mmpretrain train: {note}", flush=True)

    def _loop(self, loaders: dict[str, Loader], log: RunLog, resumed_from) -> dict[str, Any]:
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
            if cfg.logging.sample_keys:
                self._write_sample_keys(Path(cfg.train.output_dir), batches)
            micro = [self._to_device(batches["image_text"][i], batches["text"][i] if "text" in batches else None)
                     for i in range(k)]
            metrics = self.train_step(micro)
            elapsed = time.perf_counter() - started
            last = self.step == cfg.train.steps
            if self.step % cfg.logging.log_every == 0 or last:
                # timing, skip counts and shard defects cross processes on logged steps only: no extra
                # collective per step
                data, defects = self._throughput(loaders, per_step, elapsed, waited)
                metrics.update(data)
                log.write("train", self.step, metrics)
                log.shard_defects(self.step, defects)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{per_step / max(elapsed, 1e-9):.0f}")
            if (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0) or last:
                save_checkpoint(acc, cfg.train.output_dir, self.step, self._meta(), loaders,
                                cfg.train.keep_checkpoints, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler)
            if self.periodic.due(self.step, last):
                results = self.evaluate()
                if results:  # the same on every process; logged and printed by the main one
                    log.write("eval", self.step, results)
                    if acc.is_main_process:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        bar.close()
        return metrics

    def _write_sample_keys(self, run_dir: Path, batches: dict[str, list]) -> None:
        """One line per step: the keys of this process's samples of the step (logging.sample_keys)."""
        folder = run_dir / "sample_keys"
        folder.mkdir(parents=True, exist_ok=True)
        line = {"step": self.step + 1, **{name: [key for b in parts for key in b.keys] for name, parts in batches.items()}}
        with open(folder / f"rank-{self.accelerator.process_index}.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def _throughput(self, loaders: dict[str, Loader], per_step: int, elapsed: float,
                    waited: float) -> tuple[dict[str, float], list[dict]]:
        """Logged-step data metrics over all processes, and the defective shards met since the last
        logged step (gathered only when some process met one)."""
        skipped = sum(n for loader in loaders.values() for reason, n in loader.skipped.items()
                      if reason != "refilled")
        refilled = sum(loader.skipped["refilled"] for loader in loaders.values())  # slots given a repeat
        found = [d for loader in loaders.values() for d in loader.take_defects()]
        shared = self._mean_over_processes({"wait": waited, "elapsed": elapsed, "skipped": skipped,
                                            "refilled": refilled, "defects": len(found)})
        world = self.accelerator.num_processes
        defects = [d for part in runtime.gather_objects(found) for d in part] if shared["defects"] else []
        return {
            "samples_per_s": per_step / max(shared["elapsed"], 1e-9),
            "data_wait": shared["wait"] / max(shared["elapsed"], 1e-9),  # fraction of the step spent waiting
            "skipped": round(shared["skipped"] * world),  # so far, all processes
            "refilled": round(shared["refilled"] * world),  # so far, all processes
            "epoch": self.step * self.cfg.train.accum_steps / len(loaders["image_text"]),
        }, defects

    def _meta(self) -> dict[str, Any]:
        return checkpoint_meta(self.step, self.model_cfg, self.heads, config_to_dict(self.cfg))

    def _to_device(self, image_text: ImageTextBatch, text: TextBatch | None) -> ImageTextBatch:
        """The micro-batch on the device; its text branch from the text loader when there is one."""
        text = text if text is not None else image_text.text
        batch = replace(image_text, text=text if self.heads.any() else None)
        return batch.to(self.accelerator.device, non_blocking=True)

    def build_loaders(self) -> dict[str, Loader]:
        cfg, acc = self.cfg, self.accelerator
        branch = TextBranch(cfg.data.masking, cfg.model.sentence_pair) if self.heads.any() else None
        return build_train_loaders(cfg.data, seed=cfg.train.seed, image_size=image_size(self.model_cfg),
                                   text_branch=branch, rank=acc.process_index, world=acc.num_processes,
                                   pin_memory=acc.device.type == "cuda")

    # -- periodic evaluation -----------------------------------------------------------------------
    def eval_model(self) -> torch.nn.Module:
        """The model evaluation runs: the bare module, which holds every weight on every process under
        DDP. FSDP shards the weights and the bare module's methods would see only this process's
        shard, so there each process evaluates an unsharded copy built from the gathered full state."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.FSDP:
            return self.bare_model
        return self.unsharded_copy()

    def unsharded_copy(self) -> torch.nn.Module:
        """A fresh model with the full weights of `self.model` (collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        copy = build_model(self.model_cfg, self._tower_options(), heads=self.heads)
        copy.load_state_dict(state, strict=True)
        return copy.to(self.accelerator.device)

    def evaluate(self) -> dict[str, float]:
        """The configured evaluations on the current weights; scalars named task/metric (main process)."""
        acc = self.accelerator
        return self.periodic.run(self.eval_model(), acc.device, acc.autocast)
