"""Loaders for training and evaluation: image–text batches and text-branch batches, with a state
that a checkpoint stores and restores to continue the identical stream.

Under `accelerate launch`, build the loader with the process's rank and world size and do NOT pass it
to `accelerator.prepare` (accelerate would make rank 0 read everything and broadcast); move batches
to the device in the train step. Every rank yields exactly `len(loader)` batches per epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmpretrain.data.plan import derive_seed
from mmpretrain.data.stream import Position, ShardStream, StreamConfig
from mmpretrain.data.text.masking import MaskingConfig
from mmpretrain.data.text.objectives import text_batch
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.errors import UserError
from mmpretrain.shards.reader import iter_tar_samples
from mmpretrain.shards.resolve import resolve

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PEEK_SAMPLES = 64  # how many samples of the first shard the up-front check reads


@dataclass(frozen=True)
class TextBranch:
    """How the text batches (MLM + AR, optional sentence pairs) are made."""

    masking: MaskingConfig = MaskingConfig()
    pair_objective: str | None = None  # None | "nsp" | "sop"


class ImageTextDecoder:
    """Raw sample -> (PIL image, caption, metadata) -> batch. Transforms run at collate time, under
    the batch's seed, so augmentation replays exactly after a resume."""

    def __init__(self, transform: Callable, tokenizer: Tokenizer, caption_key: str = "txt",
                 text_branch: TextBranch | None = None, require_caption: bool = True):
        self.transform, self.tokenizer, self.caption_key = transform, tokenizer, caption_key
        self.text_branch, self.require_caption = text_branch, require_caption
        with torch.random.fork_rng(devices=[]):  # the output shape, for empty evaluation batches
            self.image_shape = tuple(transform(Image.new("RGB", (32, 32))).shape)

    def reject(self, sample: dict) -> str | None:
        if not any(k in sample for k in IMAGE_KEYS):
            return "missing_image"
        return _caption_problem(sample.get(self.caption_key)) if self.require_caption else None

    def decode(self, sample: dict, skipped: Counter):
        ext = next(k for k in IMAGE_KEYS if k in sample)
        try:
            image = Image.open(io.BytesIO(sample[ext]))
            image.load()
            image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            skipped["decode_error"] += 1
            return None
        meta = _metadata(sample)
        # Without require_caption (zero-shot on labelled images) a sample may have no usable caption.
        caption = "" if _caption_problem(sample.get(self.caption_key)) else sample[self.caption_key].decode().strip()
        return {
            "image": image,
            "caption": caption,
            "all_captions": _all_captions(meta, caption),
            "key": sample["__key__"],
            "label": _label(sample),
            "hash": _image_hash(sample, ext, meta),
            "source": (sample["__url__"], sample["__index__"]),
        }

    def collate(self, items: list[dict], seed: int) -> dict:
        with torch.random.fork_rng(devices=[]):  # augmentation draws from the batch's own seed
            torch.manual_seed(seed)
            images = [self.transform(item["image"]) for item in items]
        captions = [item["caption"] for item in items]
        tokens = self.tokenizer.encode(captions)
        batch = {
            "images": torch.stack(images) if images else torch.empty((0, *self.image_shape)),
            "tokens": tokens.ids,
            "eot_index": tokens.eot_index,
            "lengths": tokens.lengths,
            "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "keys": [item["key"] for item in items],
            "image_hashes": [item["hash"] for item in items],
            "captions": captions,
            "all_captions": [item["all_captions"] for item in items],
            "sources": [item["source"] for item in items],  # (shard url, index in the shard)
        }
        if self.text_branch is not None:  # no text shards: the text branch learns from the captions
            generator = torch.Generator().manual_seed(seed)
            batch["text"] = text_batch(captions, self.tokenizer, self.text_branch.masking, generator,
                                       self.text_branch.pair_objective)
        return batch


class TextDecoder:
    """Text-only shards -> MLM/AR (and optional sentence-pair) batches.

    With `sample_seed` (evaluation) each text is masked with a generator seeded by (sample_seed, its
    key), so the masks do not depend on batch composition or on the number of processes."""

    def __init__(self, tokenizer: Tokenizer, text_branch: TextBranch, text_key: str = "txt",
                 sample_seed: int | None = None):
        self.tokenizer, self.text_branch, self.text_key = tokenizer, text_branch, text_key
        self.sample_seed = sample_seed

    def reject(self, sample: dict) -> str | None:
        return _caption_problem(sample.get(self.text_key))

    def decode(self, sample: dict, skipped: Counter):
        return sample["__key__"], sample[self.text_key].decode("utf-8").strip()

    def collate(self, items: list[tuple[str, str]], seed: int) -> dict:
        texts = [text for _, text in items]
        branch = self.text_branch
        if self.sample_seed is None:
            generator = torch.Generator().manual_seed(seed)
            batch = text_batch(texts, self.tokenizer, branch.masking, generator, branch.pair_objective)
        else:
            rows = [text_batch([text], self.tokenizer, branch.masking,
                               torch.Generator().manual_seed(derive_seed(self.sample_seed, "mask", key)),
                               branch.pair_objective) for key, text in items]
            empty = text_batch([], self.tokenizer, branch.masking, torch.Generator(), None)
            batch = {k: torch.cat([r[k] for r in rows]) if rows else v for k, v in empty.items()}
        batch["texts"] = texts
        batch["keys"] = [key for key, _ in items]
        return batch


class Loader:
    """One epoch per `iter()`; `state_dict()` says how far it got, `load_state_dict()` resumes there.
    `skipped` counts samples dropped as unusable, by reason (for logging)."""

    def __init__(self, stream: ShardStream, num_workers: int = 2, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        self.stream, self.num_workers = stream, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.skipped: Counter = Counter()

    def __len__(self) -> int:
        return self.stream.batches_per_epoch()

    @property
    def epoch(self) -> int:
        return self.stream.position.epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.position = Position(epoch=epoch)

    def state_dict(self) -> dict:
        pos = self.stream.position
        return {"epoch": pos.epoch, "batches": pos.batches, "raw": dict(pos.raw), "num_workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_workers", self.num_workers) != self.num_workers:
            raise UserError(
                f"the checkpoint's loader ran with {state['num_workers']} workers, this one with "
                f"{self.num_workers}; exact resume needs the same data.num_workers"
            )
        self.stream.position = Position(state["epoch"], state["batches"], {int(k): v for k, v in state["raw"].items()})

    def __iter__(self) -> Iterator[dict]:
        pos = self.stream.position
        if pos.batches >= len(self):
            self.set_epoch(pos.epoch + 1)
            pos = self.stream.position
        loader = DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None, persistent_workers=False,
        )
        for batch in loader:
            meta = batch.pop("__meta__")
            pos.batches += 1
            pos.raw[meta["worker"]] = meta["raw"]
            self.skipped.update(meta["skipped"])
            yield batch

    def forever(self) -> Iterator[dict]:
        """Epoch after epoch (resampled training, step-based schedules)."""
        while True:
            yield from self


def image_text_loader(cfg: StreamConfig, *, tokenizer: Tokenizer, transform: Callable, rank: int = 0,
                      world: int = 1, num_workers: int = 2, caption_key: str = "txt",
                      text_branch: TextBranch | None = None, pin_memory: bool = False,
                      require_caption: bool = True) -> Loader:
    shards = resolve(list(cfg.shards), need_sizes=cfg.mode == "epoch" or not cfg.samples_per_epoch)
    decoder = ImageTextDecoder(transform, tokenizer, caption_key, text_branch, require_caption)
    _check_first_shard(shards[0].url, decoder)
    return _loader(cfg, shards, decoder, rank, world, num_workers, pin_memory)


def text_loader(cfg: StreamConfig, *, tokenizer: Tokenizer, text_branch: TextBranch, rank: int = 0,
                world: int = 1, num_workers: int = 2, text_key: str = "txt",
                sample_seed: int | None = None) -> Loader:
    shards = resolve(list(cfg.shards), need_sizes=cfg.mode == "epoch" or not cfg.samples_per_epoch)
    decoder = TextDecoder(tokenizer, text_branch, text_key, sample_seed)
    _check_first_shard(shards[0].url, decoder)
    return _loader(cfg, shards, decoder, rank, world, num_workers, False)


def _loader(cfg, shards, decoder, rank, world, num_workers, pin_memory) -> Loader:
    stream = ShardStream(cfg, shards, decoder, rank, world)
    if stream.batches_per_epoch() == 0:
        raise UserError(
            f"{stream.total_samples()} samples cannot fill one batch of {cfg.batch_size} on each of "
            f"{world} processes; lower the batch size or add data"
        )
    return Loader(stream, num_workers=num_workers, pin_memory=pin_memory)


def _check_first_shard(url: str, decoder) -> None:
    """Fail in seconds, naming the shard, when its samples lack what the loader needs (a shard set
    without captions would otherwise yield nothing, forever: open_clip #569)."""
    reasons: Counter = Counter()
    members: set[str] = set()
    for sample in iter_tar_samples(url, 0, PEEK_SAMPLES):
        reason = decoder.reject(sample)
        if reason is None:
            return
        reasons[reason] += 1
        members.update(k for k in sample if not k.startswith("__"))
    if reasons:
        raise UserError(
            f"shard {url}: none of its first {sum(reasons.values())} samples is usable "
            f"({', '.join(f'{r} {n}' for r, n in reasons.items())}; members present: {sorted(members)}); "
            "check the caption/image keys or re-run `mmpretrain prepare`"
        )
    raise UserError(f"shard {url} holds no samples")


def _caption_problem(raw: bytes | None) -> str | None:
    if raw is None:
        return "missing_caption"
    try:
        return None if raw.decode("utf-8").strip() else "empty_caption"
    except UnicodeDecodeError:
        return "caption_not_utf8"


def _label(sample: dict) -> int:
    try:
        return int(sample["cls"].decode().strip()) if "cls" in sample else -1
    except (ValueError, UnicodeDecodeError):
        return -1


def _metadata(sample: dict) -> dict:
    """The sample's `.json` as a dict ({} when absent or unreadable: metadata is optional)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _all_captions(meta: dict, caption: str) -> list[str]:
    """Every caption of the image: the `.json`'s "captions" list when it holds strings (COCO/Flickr
    style evaluation sets), else the one `.txt` caption."""
    listed = meta.get("captions")
    if isinstance(listed, list):
        captions = [c.strip() for c in listed if isinstance(c, str) and c.strip()]
        if captions:
            return captions
    return [caption]


def _image_hash(sample: dict, ext: str, meta: dict) -> str:
    """The sha256 that `prepare` recorded, else the hash of the image bytes (same definition)."""
    digest = meta.get("sha256")
    return digest if isinstance(digest, str) else hashlib.sha256(sample[ext]).hexdigest()
