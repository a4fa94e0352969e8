"""Fixtures shared by several test files: brute-force references and measuring tools, so tests never
import each other's private helpers."""

from __future__ import annotations

import os
import statistics

import pytest
import torch
from helpers import free_port, write_shards
from s3server import S3Server
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LargestOutput(TorchDispatchMode):
    """Records the largest numel of any op output (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


@pytest.fixture
def largest_output():
    """The LargestOutput context manager: `with largest_output() as rec: ...; rec.numel`."""
    return LargestOutput


# -- retrieval reference: the whole score matrix, one Python sort per query ---------------------
def _sorted_keys(row: list[float]) -> list[int]:
    """Key indices best first: score descending, then index ascending (the documented tie rule)."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def _reference_ranks(image_emb, text_emb, t2i):
    scores = (image_emb @ text_emb.T).tolist()  # (Ni, Nt), the whole matrix at once
    by_text = [list(col) for col in zip(*scores)]  # (Nt, Ni)
    t2i = t2i.tolist()
    t2i_ranks = [_sorted_keys(by_text[t]).index(t2i[t]) + 1 for t in range(len(t2i))]
    i2t_ranks = []
    for i, row in enumerate(scores):
        order = _sorted_keys(row)
        i2t_ranks.append(min(order.index(t) + 1 for t in range(len(t2i)) if t2i[t] == i))
    return i2t_ranks, t2i_ranks


def _reference_metrics(image_emb, text_emb, t2i, ks=(1, 5, 10)):
    out = {}
    for name, ranks in zip(("image_to_text_", "text_to_image_"), _reference_ranks(image_emb, text_emb, t2i)):
        out.update({f"{name}R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks})
        out[f"{name}mean_rank"] = sum(ranks) / len(ranks)
        out[f"{name}median_rank"] = float(statistics.median(ranks))
    return out


def _benchmark_recall(image_emb, text_emb, positive, k):
    """CLIP_benchmark's R@k re-derived: the whole (Nt, Ni) score matrix, torch.topk per row, a query
    hits when any of its positives is among its top k. `positive` (Nt, Ni) bool. -> (t2i, i2t)."""
    scores = text_emb @ image_emb.T

    def hits(s, pos):
        top = torch.topk(s, min(k, s.shape[1]), dim=1).indices  # (Nq, k)
        return pos.gather(1, top).any(1).double().mean().item()

    return hits(scores, positive), hits(scores.T, positive.T)


class RetrievalReference:
    sorted_keys = staticmethod(_sorted_keys)
    ranks = staticmethod(_reference_ranks)
    metrics = staticmethod(_reference_metrics)
    benchmark_recall = staticmethod(_benchmark_recall)


@pytest.fixture
def retrieval_reference():
    """`.ranks(image, text, t2i)` -> (image->text, text->image) ranks; `.metrics(...)` -> R@k, mean/median."""
    return RetrievalReference


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(image-text pattern, text pattern): 24 image-caption samples in shards of 13 and 11, 18 texts in 9 + 9."""
    root = tmp_path_factory.mktemp("shards")
    return write_shards(root / "img", [13, 11]), write_shards(root / "txt", [9, 9], text_only=True)


# -- object storage: a real S3-compatible server (moto) on 127.0.0.1 ------------------------------
@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3Server (tests/s3server.py) for the session, its endpoint and dummy credentials in
    os.environ (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) so that botocore/s3fs in this process and
    subprocesses started with helpers.subprocess_env() reach it; the environment is restored after.
    `s3.upload(folder, "s3://bucket/prefix")`, `s3.keys(url)`, `s3.new_bucket()`."""
    server = S3Server(free_port(), tmp_path_factory.mktemp("s3") / "moto.log").start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3):
    """A fresh, empty bucket on the `s3` server: "s3://NAME". Cached s3fs instances (and their
    listings) are dropped before and after, so each test sees the store as it is."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3.new_bucket()
    s3fs.S3FileSystem.clear_instance_cache()
