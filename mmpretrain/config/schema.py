"""The training configuration's schema: typed sections, one docstring per field.

Every closed set of choices is a `Literal` alias defined here once; the loader (mmpretrain.config.load)
checks values against it, and code that needs the list (a CLI's choices, an error message) calls
`choices(Alias)` instead of restating it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

DataMode = Literal["resampled", "epoch"]
Contrastive = Literal["clip", "siglip"]
ScheduleName = Literal["cosine", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
PairObjective = Literal["nsp", "sop"]
MaskStrategy = Literal["token", "whole_word", "span"]
Positives = Literal["sample", "image", "caption"]  # retrieval: which captions hit which images


def choices(alias) -> tuple[str, ...]:
    """The allowed values of a Literal alias, in declaration order."""
    return get_args(alias)


@dataclass(frozen=True)
class MaskingConfig:
    probability: float = 0.15
    """Expected fraction of maskable tokens that are selected (predicted)."""
    strategy: MaskStrategy = "token"
    """"token" (BERT), "whole_word" (all BPE pieces of a word together) or "span" (SpanBERT)."""
    mask_fraction: float = 0.8
    """Of the selected units, the share replaced by `<mask>`."""
    random_fraction: float = 0.1
    """Of the selected units, the share replaced by random ordinary tokens; the rest stay unchanged."""
    span_p: float = 0.2
    """Geometric parameter of span lengths in words (SpanBERT: 0.2)."""
    max_span: int = 10
    """Longest span in words; lengths follow the geometric law renormalised on 1..max_span, as in
    SpanBERT's code (mean 3.8 words for 0.2 / 10), not min(geometric, max_span) (mean 4.46)."""

    def __post_init__(self):
        def bad(name: str, why: str):
            raise ValueError(f"masking.{name} = {getattr(self, name)!r}: {why}")

        if not 0.0 < self.probability < 1.0:
            bad("probability", "must be in (0, 1)")
        if self.strategy not in choices(MaskStrategy):
            bad("strategy", f"must be one of {', '.join(choices(MaskStrategy))}")
        for name in ("mask_fraction", "random_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be in [0, 1]")
        if self.mask_fraction + self.random_fraction > 1.0 + 1e-9:
            bad("random_fraction", f"mask_fraction + random_fraction must be <= 1 (mask_fraction = {self.mask_fraction})")
        if not 0.0 < self.span_p <= 1.0:
            bad("span_p", "must be in (0, 1]")
        if self.max_span < 1:
            bad("max_span", "must be >= 1")


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Architecture: a shipped model name (mmpretrain/models/model_configs), a model-config .json path, or an open_clip built-in name."""
    pretrained: str | None = None
    """open_clip weights (.safetensors/.pt/.bin) to start from; None = random init."""
    mlm: bool = True
    """Masked-LM head on the bidirectional text trunk."""
    ar: bool = True
    """Autoregressive (next-token) head on the causal text trunk."""
    sentence_pair: PairObjective | None = None
    """None, "nsp" or "sop": a sentence-pair head trained on the text batches."""
    patch_dropout: float = 0.0
    """Fraction of image patches dropped in training (FLIP); 0 = off."""
    lock_image: bool = False
    """Freeze the image tower (LiT)."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave this many last layer groups trainable."""
    grad_checkpointing: bool = False
    """Recompute activations in backward, trading compute for memory."""
    compile: bool = False
    """torch.compile the model."""


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)
    """Image-text shard patterns (brace/glob patterns, folders, or `pipe:` URLs) for training."""
    train_weights: list[float] | None = None
    """Per-pattern sampling weights (resampled mode); None = equal."""
    text_shards: list[str] = field(default_factory=list)
    """Text-only shard patterns for the MLM/AR branch; empty = learn the text branch from captions."""
    batch_size: int = 64
    """Image-text pairs per process per micro-batch (global batch = batch_size x processes x accum_steps)."""
    text_batch_size: int = 64
    """Text documents per process per micro-batch (with text_shards)."""
    mode: DataMode = "resampled"
    """"resampled" (each source its weight's share of a virtual epoch, step-based runs) or "epoch" (each sample once per epoch)."""
    samples_per_epoch: int | None = None
    """Resampled mode: length of a virtual epoch (for the epoch count); None = all samples."""
    shuffle_buffer: int = 1000
    """Samples per shuffle window of the global sample order (after the shard shuffle)."""
    num_workers: int = 2
    """DataLoader workers per process; a resume may use another number (and another process count)."""
    context_length: int = 77
    """Tokens per text, <start> and <end> included; must not exceed the model's context length."""
    augmentation: dict = field(default_factory=dict)
    """open_clip AugmentationCfg fields for training images (scale, color_jitter, ...)."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """How MLM inputs are corrupted."""
    max_member_bytes: int = 64 * 2**20
    """Largest shard member (image, caption, ...) the loader reads, in bytes (64 MiB); a sample with a
    larger one is skipped, counted as "too_large" and its shard named. Checked from the tar header before
    anything is read, so a broken header claiming 100 GB costs a skip, not the run."""


@dataclass
class LossConfig:
    contrastive: Contrastive = "clip"
    """"clip" (symmetric InfoNCE) or "siglip" (pairwise sigmoid)."""
    tile_size: int | None = None
    """InfoNCE in tiles of this many rows (never the full logits matrix); None = plain."""
    local_loss: bool = False
    """InfoNCE: each process scores only its own rows against all (O(n x B) logits)."""
    clip_weight: float = 1.0
    """Weight of the contrastive loss."""
    mlm_weight: float = 1.0
    """Weight of the masked-LM loss (when the head is on)."""
    ar_weight: float = 1.0
    """Weight of the next-token loss (when the head is on)."""
    pair_weight: float = 1.0
    """Weight of the sentence-pair loss (when the head is on)."""
    token_chunk_size: int = 2048
    """Predicted tokens decoded at a time by the MLM/AR losses (memory: chunk x vocab)."""
    mlm_fraction: float = 1.0
    """Share of the masked positions the MLM loss decodes each step: 1 = all (the exact loss); below 1, a
    uniform random subset weighted to an unbiased estimate of the same loss and gradient, for about that
    share of the decoder's cost (mmpretrain.losses.text)."""
    ar_fraction: float = 1.0
    """Share of the next-token positions the AR loss decodes each step; as mlm_fraction."""
    text_weight_end: float = 1.0
    """Text heads' weight at the last step, as a multiple of loss.{mlm,ar,pair}_weight: the multiplier is
    1 until text_weight_decay_from, then follows a cosine down to this value (1 = constant weights; 0 =
    a warm-down that ends on the contrastive loss alone). Logged as text_weight."""
    text_weight_decay_from: float = 0.0
    """Where the text weights' cosine starts, as a fraction of train.steps (0 = from the first step)."""


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.2
    """AdamW weight decay; never applied to biases, norms, the temperature, or any 1-D parameter."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None = no clipping."""
    fused: bool = True
    """torch's fused AdamW kernel (one pass over each parameter, on CPU, CUDA and the other devices torch
    has it for); on CPU the tiny model's update takes 8 ms instead of 48 ms with torch's default per-tensor
    loop. false = torch's default (a loop on CPU, foreach on CUDA). Same update up to float rounding."""


@dataclass
class ScheduleConfig:
    name: ScheduleName = "cosine"
    """"cosine" (decay to min_lr_ratio x lr) or "constant" (after warmup)."""
    warmup_steps: int = 100
    """Linear warmup from 0 over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine floor, as a fraction of the peak learning rate."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in the run."""
    accum_steps: int = 1
    """Micro-batches per optimizer step; contrastive accumulation is exact (features cached, recomputed)."""
    precision: Precision = "fp32"
    """"fp32", "bf16" or "fp16" (mixed precision through Accelerate)."""
    seed: int = 0
    """Seeds model init, data order, masking and augmentation."""
    output_dir: str = "runs/run"
    """Run directory: config.yaml, checkpoints/, metrics.jsonl, tracker logs."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """Keep the last this many checkpoints."""
    resume: str | None = None
    """None, "latest" (the run directory's newest checkpoint), a checkpoint path, or an open_clip_train
    epoch_N.pt (weights, AdamW moments and step; into a new train.output_dir)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every this many steps (and at the end); 0 = never during training."""
    retrieval_shards: list[str] = field(default_factory=list)
    """Held-out image-text shards for retrieval."""
    retrieval_positives: Positives = "sample"
    """Retrieval positives: "sample" (each sample its own image, as CLIP_benchmark), "image" (samples
    with equal image hash are one image), "caption" (also images with exactly the same caption)."""
    zeroshot_shards: list[str] = field(default_factory=list)
    """Labelled image shards (KEY.cls) for zero-shot classification."""
    classnames: str | None = None
    """Class-name file or built-in set ("imagenet1k") for zero-shot; None = the shards' dataset.json
    (or CLIP_benchmark's classnames.txt)."""
    templates: str | None = None
    """Prompt-template file ({} or {c}) or built-in set ("default", "openai", "openai-7") for
    zero-shot; None = CLIP_benchmark's templates file beside the shards, else "default"."""
    text_shards: list[str] = field(default_factory=list)
    """Held-out text shards for MLM accuracy and AR perplexity."""
    batch_size: int = 256
    """Evaluation batch size per process."""
    max_samples: int | None = None
    """Evaluate on at most this many samples per task (periodic evaluation cost); None = all."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Log metrics every this many steps."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers: "tensorboard", "wandb", ... (metrics.jsonl is always written)."""
    project: str = "mmpretrain"
    """Tracker project name (wandb)."""
    progress: bool = True
    """Progress bar on the main process."""
    sample_keys: bool = False
    """Write the keys of the samples each process trained on, per step, to RUN/sample_keys/rank-R.jsonl
    (to check what a run read: a global batch is the same samples on any number of processes)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
