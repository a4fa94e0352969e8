"""Evaluating a model on shards: embed in batches on every process, gather, score on the main one.

Each process streams its own share of the shards (epoch mode, no shuffle, every sample once), so the
embedding work is split across processes; the per-sample results are then gathered and put in one
order that does not depend on the number of processes — (shard, position in shard) — before any
metric is computed. A 2-process evaluation therefore scores exactly the rows a 1-process one does.
Metrics come from mmpretrain.eval's functions, which never see the model.

Under DDP pass the unwrapped model; the collectives here are plain torch.distributed ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from mmpretrain.config import MaskingConfig
from mmpretrain.data.loader import TextBranch, image_text_loader, text_loader
from mmpretrain.data.stream import StreamConfig
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.data.transforms import image_transforms
from mmpretrain.eval.retrieval import (
    EvalInputError,
    RetrievalPositives,
    retrieval_metrics,
    retrieval_positives,
)
from mmpretrain.eval.text_metrics import TextMetrics, ar_counts, mlm_counts
from mmpretrain.eval.zeroshot import class_embeddings, classification_metrics
from mmpretrain.losses.collectives import all_gather_with_grad
from mmpretrain.runtime import broadcast_from_main, gather_objects, gather_sizes, rank_and_world
from mmpretrain.shards.resolve import ShardSource

LOGIT_CHUNK = 2048  # text positions decoded at a time: chunk x vocab logits, never B x L x vocab


@dataclass
class EvalSettings:
    batch_size: int = 256
    """Samples per process per forward."""
    num_workers: int = 2
    """DataLoader workers per process."""
    chunk_size: int = 1024
    """Query rows scored at a time by the metrics (memory O(N x chunk))."""
    progress: bool = True
    """A progress bar on the main process."""


@dataclass
class Embeddings:
    """Gathered per-sample results in (shard, index) order; text rows grouped by sample."""

    image: Tensor  # (S, d) float32, normalised
    labels: Tensor  # (S,) long, -1 = no KEY.cls
    hashes: list[str]  # (S,) image content hashes
    sources: list[tuple[str, int]]  # (S,) (shard url, index in the shard)
    text: Tensor | None = None  # (T, d) float32, normalised: one row per caption
    text_sample: Tensor | None = None  # (T,) long: the sample row of each caption
    captions: list[str] = field(default_factory=list)  # (T,)
    skipped: dict[str, int] = field(default_factory=dict)  # unusable samples by reason, all processes


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    """The task's metrics, the same on every process."""
    embeddings: Embeddings | None = None
    """The gathered embeddings behind them (retrieval, zero-shot), on the main process only."""


class Evaluator:
    """Retrieval, zero-shot classification and text metrics for one model on one or many processes.

    `model` is a MultitaskModel already on `device`; `autocast` returns the forward's precision
    context (e.g. accelerator.autocast). Every process gets the task's EvalResult; the gathered
    embeddings stay on the main process, which scores them.
    """

    def __init__(self, model, model_config: dict, *, device: torch.device | str = "cpu",
                 settings: EvalSettings = EvalSettings(), autocast: Callable = nullcontext):
        self.model, self.device, self.settings, self.autocast = model, torch.device(device), settings, autocast
        self.rank, self.world = rank_and_world()
        size = model_config["vision_cfg"].get("image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.tokenizer = Tokenizer(context_length=model_config["text_cfg"].get("context_length", 77))
        self.embed_dim = model_config["embed_dim"]  # for the (0, d) results of a process with no samples

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- tasks -------------------------------------------------------------------------------------
    def retrieval(self, shards: Sequence[str], ks: Sequence[int] = (1, 5, 10), *,
                  positives: str = "sample") -> EvalResult:
        """Image<->text R@k, mean/median rank; `positives` says which captions hit which images
        (eval.retrieval: "sample" as CLIP_benchmark, "image" = equal hashes merged, "caption")."""
        emb = self.embed(shards, texts=True)

        def score() -> dict:
            pos = self.positives(emb, positives)
            image = emb.image[pos.image_rows]  # (Ni, d)
            metrics = retrieval_metrics(image, emb.text, pos.text_to_image, ks=tuple(ks), pairs=pos.pairs,
                                        chunk_size=self.settings.chunk_size)
            return {**metrics, "num_samples": len(emb.sources)}

        return self._shared(score, emb)

    def zeroshot(self, shards: Sequence[str], classnames: Sequence[str], templates: Sequence[str]) -> EvalResult:
        """Top-1/5 and mean per-class recall against prompt-averaged class embeddings; labels = KEY.cls."""
        emb = self.embed(shards, texts=False)
        return self._shared(lambda: self._classify(emb, shards, classnames, templates), emb)

    def _classify(self, emb: Embeddings, shards: Sequence[str], classnames: Sequence[str],
                  templates: Sequence[str]) -> dict:
        labelled = emb.labels >= 0
        if not labelled.any():
            raise EvalInputError(f"zeroshot: none of the {len(emb.labels)} samples of {', '.join(shards)} has a "
                                 "label (KEY.cls); prepare labelled shards (class folders or --label-column)")
        top = int(emb.labels.max())
        if top >= len(classnames):
            raise EvalInputError(f"zeroshot: label {top} in {', '.join(shards)} but only {len(classnames)} class "
                                 "names; give the matching class-name file")
        class_emb = class_embeddings(self.encode_texts, classnames, templates, batch_size=self.settings.batch_size)
        metrics = classification_metrics(emb.image[labelled], class_emb, emb.labels[labelled],
                                         chunk_size=self.settings.chunk_size)
        metrics["unlabelled"] = int((~labelled).sum())
        return metrics

    def _shared(self, score: Callable[[], dict], emb: Embeddings) -> EvalResult:
        """Metrics scored on the main process, then handed to every process; a bad input found while
        scoring is the same EvalInputError on all of them (none is left waiting in a collective)."""
        outcome: tuple[str, Any] = ("skip", None)
        if self.is_main:
            try:
                outcome = ("ok", score())
            except EvalInputError as exc:
                outcome = ("error", str(exc))
        kind, value = broadcast_from_main(outcome)
        if kind == "error":
            raise EvalInputError(value)
        return EvalResult(value, emb if self.is_main else None)

    @torch.no_grad()
    def text(self, shards: Sequence[str], *, seed: int = 0, masking: MaskingConfig = MaskingConfig(),
             heads: tuple[str, ...] = ("mlm", "ar")) -> EvalResult:
        """MLM accuracy on masked tokens (masks seeded per text) and AR perplexity, token-weighted."""
        loader = text_loader(self._stream(shards), tokenizer=self.tokenizer, text_branch=TextBranch(masking),
                             rank=self.rank, world=self.world, num_workers=self.settings.num_workers,
                             sample_seed=seed)
        sums, texts = TextMetrics(), 0
        for batch in self._progress(loader, "text"):
            if not batch.texts:
                continue
            texts += len(batch.texts)
            with self.autocast():
                out = self.model.text_predictions(batch.to(self.device), names=heads)
            for logits, labels in out["mlm"].logit_chunks(LOGIT_CHUNK) if "mlm" in out else ():
                correct, count = mlm_counts(logits, labels)
                sums.update(mlm_correct=correct, mlm_tokens=count)
            for logits, labels in out["ar"].logit_chunks(LOGIT_CHUNK) if "ar" in out else ():
                nll, count = ar_counts(logits, labels)
                sums.update(ar_nll_sum=nll, ar_tokens=count)
        totals = torch.cat([sums.as_tensor(), torch.tensor([float(texts)], dtype=torch.float64)])
        if self.world > 1:
            totals = totals.to(self.device)
            dist.all_reduce(totals)
        totals = totals.cpu()  # every process holds the reduced sums: each scores them itself
        return EvalResult({**TextMetrics.from_tensor(totals[:-1]).result(), "num_texts": int(totals[-1])})

    # -- embeddings --------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, shards: Sequence[str], *, texts: bool) -> Embeddings:
        """Every sample's image embedding (and, with `texts`, every caption's), gathered on all processes."""
        loader = image_text_loader(
            self._stream(shards), tokenizer=self.tokenizer, transform=image_transforms(self.image_size, train=False),
            rank=self.rank, world=self.world, num_workers=self.settings.num_workers, require_caption=texts,
        )
        images, text_parts, counts = [], [], []
        meta: dict[str, list] = {"labels": [], "hashes": [], "sources": [], "captions": []}
        for batch in self._progress(loader, "embed"):
            if not batch.keys:  # a process's share can end with an empty batch (every rank yields as many)
                continue
            with self.autocast():
                images.append(self.model.encode_image(batch.images.to(self.device)).float().cpu())
            meta["labels"] += batch.labels.tolist()
            meta["hashes"] += batch.image_hashes
            meta["sources"] += batch.sources
            if texts:
                captions = [c for caps in batch.all_captions for c in caps]
                counts += [len(caps) for caps in batch.all_captions]
                meta["captions"] += captions
                if captions == batch.captions:  # one caption per sample: the loader's workers tokenized it
                    text_parts.append(self._encode_tokens(batch.tokens, batch.eot_index))
                else:
                    text_parts.append(self.encode_texts(captions))
        local_image = torch.cat(images) if images else torch.empty(0, self.embed_dim)
        local_text = torch.cat(text_parts) if text_parts else torch.empty(0, local_image.shape[1])
        return self._assemble(local_image, local_text if texts else None, counts, meta, loader.skipped)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """(n, d) normalised CLIP text embeddings, float32 on the CPU, in batches."""
        tokens = self.tokenizer.encode(list(texts))
        return self._encode_tokens(tokens.ids, tokens.eot_index)

    @torch.no_grad()
    def _encode_tokens(self, ids: Tensor, eot_index: Tensor) -> Tensor:
        parts = []
        for start in range(0, len(ids), self.settings.batch_size):
            stop = start + self.settings.batch_size
            with self.autocast():
                emb = self.model.encode_text(ids[start:stop].to(self.device), eot_index[start:stop].to(self.device))
            parts.append(emb.float().cpu())
        return torch.cat(parts) if parts else torch.empty(0, self.embed_dim)

    @staticmethod
    def positives(emb: Embeddings, positives: str) -> RetrievalPositives:
        """The images (sample rows) and each caption's positives under `positives`."""
        return retrieval_positives(positives, emb.text_sample, emb.hashes, emb.captions)

    # -- gathering ---------------------------------------------------------------------------------
    def _assemble(self, image: Tensor, text: Tensor | None, counts: list[int], meta: dict,
                  skipped: Counter) -> Embeddings:
        image = self._gather_rows(image)
        labels = self._gather_rows(torch.tensor(meta["labels"], dtype=torch.long))
        hashes, sources = self._gather_list(meta["hashes"]), self._gather_list(meta["sources"])
        all_skipped = Counter()
        for part in gather_objects(dict(skipped)):
            all_skipped.update(part)
        if not sources:
            raise EvalInputError(f"no usable samples in the shards (skipped: {dict(all_skipped) or 'none'})")
        order = sorted(range(len(sources)), key=sources.__getitem__)  # (S,) process-independent order
        emb = Embeddings(image=image[order], labels=labels[order], hashes=[hashes[i] for i in order],
                         sources=[sources[i] for i in order], skipped=dict(all_skipped))
        if text is not None:
            text = self._gather_rows(text)
            per_sample = np.asarray(self._gather_list(counts), dtype=np.int64)  # captions of each sample
            starts = np.cumsum(per_sample) - per_sample
            counts_sorted = per_sample[order]
            # caption rows of the samples in the new order: start of the sample + 0..count-1
            rows = np.repeat(starts[order], counts_sorted) + _ranges(counts_sorted)
            captions = self._gather_list(meta["captions"])
            emb.text = text[torch.from_numpy(rows)]
            emb.text_sample = torch.from_numpy(np.repeat(np.arange(len(order)), counts_sorted))
            emb.captions = [captions[r] for r in rows.tolist()]
        return emb

    def _gather_rows(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        moved = x.to(self.device)
        with torch.no_grad():
            return all_gather_with_grad(moved, gather_sizes(len(moved), self.device)).cpu()

    def _gather_list(self, items: list) -> list:
        return [x for part in gather_objects(items) for x in part]

    # -- plumbing ----------------------------------------------------------------------------------
    def _stream(self, shards: Sequence[str]) -> StreamConfig:
        if not shards:
            raise EvalInputError("no shards given; pass --shards PATTERN")
        return StreamConfig(shards=tuple(ShardSource(p) for p in shards), batch_size=self.settings.batch_size,
                            mode="epoch", shuffle=False, drop_last=False)

    def _progress(self, loader, what: str):
        show = self.settings.progress and self.is_main
        return tqdm(loader, total=len(loader), desc=what, unit="batch", disable=not show, leave=False)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated 0..c-1 for each c in counts."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - counts, counts)

