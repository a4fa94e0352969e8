"""Loaders for training and evaluation: image–text batches and text-branch batches, with a state
that a checkpoint stores and restores to continue the identical stream.

Under `accelerate launch`, build the loader with the process's rank and world size and do NOT pass it
to `accelerator.prepare` (accelerate would make rank 0 read everything and broadcast); move batches
to the device in the train step. Every rank yields exactly `len(loader)` batches per epoch.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmpretrain.config import DataConfig, MaskingConfig, PairObjective
from mmpretrain.data.plan import derive_seed
from mmpretrain.data.records import ImageTextBatch, TextBatch
from mmpretrain.data.stream import Position, ShardStream, StreamConfig, unusable
from mmpretrain.data.text.objectives import sample_text_batch
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.data.transforms import image_transforms
from mmpretrain.errors import UserError
from mmpretrain.shards.format import (
    all_captions,
    caption_problem,
    image_ext,
    image_hash,
    member_bytes,
    sample_label,
    sample_metadata,
)
from mmpretrain.shards.reader import ShardError, iter_tar_samples
from mmpretrain.shards.resolve import Shard, ShardSource, resolve

PEEK_SAMPLES = 64  # how many samples of the first shard the up-front check reads


@dataclass(frozen=True)
class TextBranch:
    """How the text batches (MLM + AR, optional sentence pairs) are made."""

    masking: MaskingConfig = MaskingConfig()
    pair_objective: PairObjective | None = None


class ImageTextDecoder:
    """Raw sample -> (PIL image, caption, metadata) -> batch. Transforms run at collate time, each
    image under its sample's seed, so augmentation replays exactly after a resume, on any number of
    processes and workers."""

    def __init__(self, transform: Callable, tokenizer: Tokenizer, caption_key: str = "txt",
                 text_branch: TextBranch | None = None, require_caption: bool = True):
        self.transform, self.tokenizer, self.caption_key = transform, tokenizer, caption_key
        self.text_branch, self.require_caption = text_branch, require_caption
        with torch.random.fork_rng(devices=[]):  # the output shape, for empty evaluation batches
            self.image_shape = tuple(transform(Image.new("RGB", (32, 32))).shape)

    def reject(self, sample: dict) -> str | None:
        if image_ext(sample) is None:
            return "missing_image"
        return caption_problem(sample.get(self.caption_key)) if self.require_caption else None

    def decode(self, sample: dict, skipped: Counter):
        ext = image_ext(sample)
        try:
            image = Image.open(io.BytesIO(sample[ext]))
            image.load()
            image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            skipped["decode_error"] += 1
            return None
        meta = sample_metadata(sample)
        # Without require_caption (zero-shot on labelled images) a sample may have no usable caption.
        caption = "" if caption_problem(sample.get(self.caption_key)) else sample[self.caption_key].decode().strip()
        return {
            "image": image,
            "caption": caption,
            "all_captions": all_captions(meta, caption),
            "key": sample["__key__"],
            "label": sample_label(sample),
            "hash": image_hash(sample, ext, meta),
            "source": (sample["__url__"], sample["__index__"]),
        }

    def collate(self, items: list[dict], seeds: list[int]) -> ImageTextBatch:
        images = []
        with torch.random.fork_rng(devices=[]):  # augmentation draws from each sample's own seed
            for item, seed in zip(items, seeds):
                torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed
                images.append(self.transform(item["image"]))  # also seeds every accelerator (0.1 ms)
        captions = [item["caption"] for item in items]
        tokens = self.tokenizer.encode(captions)
        text = None
        if self.text_branch is not None:  # no text shards: the text branch learns from the captions
            text = sample_text_batch(captions, seeds, self.tokenizer, self.text_branch.masking,
                                     self.text_branch.pair_objective)
        return ImageTextBatch(
            images=torch.stack(images) if images else torch.empty((0, *self.image_shape)),
            tokens=tokens.ids, eot_index=tokens.eot_index, lengths=tokens.lengths,
            labels=torch.tensor([item["label"] for item in items], dtype=torch.long),
            keys=[item["key"] for item in items], image_hashes=[item["hash"] for item in items],
            captions=captions, all_captions=[item["all_captions"] for item in items],
            sources=[item["source"] for item in items], text=text,
        )


class TextDecoder:
    """Text-only shards -> MLM/AR (and optional sentence-pair) batches.

    Each text is masked with its own generator: seeded by its place in the epoch's sequence
    (training), or with `sample_seed` (evaluation) by (sample_seed, its key), so the masks do not
    depend on batch composition or on the number of processes."""

    def __init__(self, tokenizer: Tokenizer, text_branch: TextBranch, text_key: str = "txt",
                 sample_seed: int | None = None):
        self.tokenizer, self.text_branch, self.text_key = tokenizer, text_branch, text_key
        self.sample_seed = sample_seed

    def reject(self, sample: dict) -> str | None:
        return caption_problem(sample.get(self.text_key))

    def decode(self, sample: dict, skipped: Counter):
        return sample["__key__"], sample[self.text_key].decode("utf-8").strip()

    def collate(self, items: list[tuple[str, str]], seeds: list[int]) -> TextBatch:
        if self.sample_seed is not None:
            seeds = [derive_seed(self.sample_seed, "mask", key) for key, _ in items]
        branch = self.text_branch
        batch = sample_text_batch([text for _, text in items], seeds, self.tokenizer, branch.masking,
                                  branch.pair_objective)
        batch.keys = [key for key, _ in items]
        return batch


class Loader:
    """One epoch per `iter()`; `state_dict()` says how far it got in the epoch's global sequence (the
    same on every process), `load_state_dict()` resumes there, on any number of processes and
    workers. `skipped` counts samples dropped as unusable, by reason, and batch slots "refilled" with
    another sample; `take_defects()` hands out the defective shards the workers met since the last
    call (for logging)."""

    def __init__(self, stream: ShardStream, num_workers: int = 2, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        self.stream, self.num_workers = stream, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.skipped: Counter = Counter()
        self._defects: list[dict] = []
        self._defects_seen: set[tuple[int, str]] = set()  # (epoch, shard): several workers may meet one

    def __len__(self) -> int:
        return self.stream.batches_per_epoch()

    def set_epoch(self, epoch: int) -> None:
        self.stream.position = Position(epoch=epoch)

    def state_dict(self) -> dict:
        pos = self.stream.position
        return {"epoch": pos.epoch, "samples": pos.samples, "global_batch": self.stream.global_batch}

    def load_state_dict(self, state: dict) -> str | None:
        """Continue at the checkpoint's place in the global sequence. Returns a line to print when the
        global batch (processes x batch size) differs from the checkpoint's, else None."""
        epoch, samples, saved = (int(state[k]) for k in ("epoch", "samples", "global_batch"))
        if epoch < 0 or samples < 0 or saved < 1:
            raise ValueError(f"position {samples} of epoch {epoch}, global batch {saved}")
        if samples > self.stream.total_samples():
            raise UserError(f"the checkpoint stands at sample {samples} of epoch {epoch}, but an epoch of these "
                            f"shards holds {self.stream.total_samples()}; resume with the shards (and "
                            "data.samples_per_epoch) the run was started with")
        self.stream.position = Position(epoch, samples)
        size = self.stream.global_batch
        if saved == size:
            return None
        return (f"the checkpoint read global batches of {saved} samples, this run reads {size} "
                f"({self.stream.world} processes x {self.stream.cfg.batch_size}): the same sample sequence "
                f"continues at sample {samples} of epoch {epoch}, cut into batches of {size}")

    def __iter__(self) -> Iterator[ImageTextBatch | TextBatch]:
        if self.stream.batches_left() == 0:
            self.set_epoch(self.stream.position.epoch + 1)
        pos, total = self.stream.position, self.stream.total_samples()
        # Its own generator: without one every iter() draws the workers' base seed from the global torch
        # generator, and a resumed run (which starts one more iterator) would continue one draw off.
        # The stream seeds all of its randomness itself, so the base seed's value does not matter.
        loader = DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None, persistent_workers=False,
            generator=torch.Generator().manual_seed(pos.epoch),
        )
        for batch, meta in loader:
            if "error" in meta:  # a user error in a worker (ShardStream.__iter__), raised as it was
                raise meta["error"]
            pos.samples = min(pos.samples + self.stream.global_batch, total)
            self.skipped.update(meta["skipped"])
            for defect in meta["defects"]:
                if (defect["epoch"], defect["shard"]) not in self._defects_seen:
                    self._defects_seen.add((defect["epoch"], defect["shard"]))
                    self._defects.append(defect)
            yield batch

    def take_defects(self) -> list[dict]:
        """{"epoch", "shard", "problem", "samples", "missing", "message"} per defective shard met."""
        taken, self._defects = self._defects, []
        return taken

    def forever(self) -> Iterator[ImageTextBatch | TextBatch]:
        """Epoch after epoch (resampled training, step-based schedules)."""
        while True:
            yield from self


def image_text_loader(cfg: StreamConfig, *, tokenizer: Tokenizer, transform: Callable, rank: int = 0,
                      world: int = 1, num_workers: int = 2, caption_key: str = "txt",
                      text_branch: TextBranch | None = None, pin_memory: bool = False,
                      require_caption: bool = True) -> Loader:
    shards = resolve(list(cfg.shards), need_sizes=True)
    decoder = ImageTextDecoder(transform, tokenizer, caption_key, text_branch, require_caption)
    _check_first_shard(shards, decoder, cfg.max_member_bytes)
    return _loader(cfg, shards, decoder, rank, world, num_workers, pin_memory)


def text_loader(cfg: StreamConfig, *, tokenizer: Tokenizer, text_branch: TextBranch, rank: int = 0,
                world: int = 1, num_workers: int = 2, text_key: str = "txt",
                sample_seed: int | None = None) -> Loader:
    shards = resolve(list(cfg.shards), need_sizes=True)
    decoder = TextDecoder(tokenizer, text_branch, text_key, sample_seed)
    _check_first_shard(shards, decoder, cfg.max_member_bytes)
    return _loader(cfg, shards, decoder, rank, world, num_workers, False)


def _loader(cfg, shards, decoder, rank, world, num_workers, pin_memory) -> Loader:
    stream = ShardStream(cfg, shards, decoder, rank, world)
    if stream.batches_per_epoch() == 0:
        raise UserError(
            f"{stream.total_samples()} samples cannot fill one batch of {cfg.batch_size} on each of "
            f"{world} processes; lower the batch size or add data"
        )
    return Loader(stream, num_workers=num_workers, pin_memory=pin_memory)


def _check_first_shard(shards: list[Shard], decoder, max_member_bytes: int | None) -> None:
    """Fail in seconds, naming the shard, when the samples of the first shard that holds any lack what
    the loader needs (a shard set without captions would otherwise yield nothing, forever: open_clip
    #569). Shards listed with 0 samples are passed over: webdataset's ShardWriter leaves such a tar."""
    url = next((s.url for s in shards if s.size != 0), None)
    if url is None:
        one = len(shards) == 1
        raise UserError(f"shard {shards[0].url} holds no samples" if one else
                        f"none of the {len(shards)} shards holds a sample (first: {shards[0].url})")
    reasons: Counter = Counter()
    present: set[str] = set()
    try:
        for sample in iter_tar_samples(url, 0, PEEK_SAMPLES, max_member_bytes=max_member_bytes):
            reason = unusable(sample, decoder)
            if reason is None:
                return
            reasons[reason] += 1
            present.update(member_bytes(sample))
    except ShardError:
        if not reasons:
            return  # a defective shard: the stream reports it (and evaluation stops on it)
    if reasons:
        raise UserError(
            f"shard {url}: none of its first {sum(reasons.values())} samples is usable "
            f"({', '.join(f'{r} {n}' for r, n in reasons.items())}; members present: {sorted(present)}); "
            "check the caption/image keys (or data.max_member_bytes) or re-run `mmpretrain prepare`"
        )
    raise UserError(f"shard {url} holds no samples")


def build_train_loaders(data: DataConfig, *, seed: int, image_size: int, text_branch: TextBranch | None,
                        rank: int = 0, world: int = 1, pin_memory: bool = False) -> dict[str, Loader]:
    """The training loaders of `data`: "image_text", and "text" when there are text shards and a text
    branch (without text shards the branch's batches are made from the captions, inside each
    ImageTextBatch)."""
    weights = data.train_weights or [1.0] * len(data.train_shards)
    stream = StreamConfig(shards=tuple(ShardSource(p, w) for p, w in zip(data.train_shards, weights)),
                          batch_size=data.batch_size, mode=data.mode, seed=seed,
                          shuffle_buffer=data.shuffle_buffer, samples_per_epoch=data.samples_per_epoch,
                          max_member_bytes=data.max_member_bytes)
    tokenizer = Tokenizer(context_length=data.context_length)
    transform = image_transforms(image_size, train=True, augmentation=data.augmentation or None)
    loaders = {"image_text": image_text_loader(
        stream, tokenizer=tokenizer, transform=transform, rank=rank, world=world, num_workers=data.num_workers,
        text_branch=None if data.text_shards else text_branch, pin_memory=pin_memory)}
    if data.text_shards and text_branch is not None:
        text_stream = StreamConfig(shards=tuple(ShardSource(p) for p in data.text_shards),
                                   batch_size=data.text_batch_size, mode=data.mode, seed=seed + 1,
                                   shuffle_buffer=data.shuffle_buffer, max_member_bytes=data.max_member_bytes)
        loaders["text"] = text_loader(text_stream, tokenizer=tokenizer, text_branch=text_branch, rank=rank,
                                      world=world, num_workers=data.num_workers)
    return loaders
