"""Helpers shared by several test files (tests never import each other): tiny shards made on the
spot, a loader over them, a training command's overrides, and a free port for a launcher."""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmpretrain.data.loader import image_text_loader
from mmpretrain.data.stream import StreamConfig
from mmpretrain.data.text.tokenizer import Tokenizer
from mmpretrain.data.transforms import image_transforms
from mmpretrain.shards.resolve import ShardSource

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/train/tiny.yaml"  # relative to ROOT, as a user types it
TOKENIZER = Tokenizer(context_length=16)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(root: Path, sizes: list[int], name: str = "s", drop: dict | None = None,
                 text_only: bool = False, first: int = 0):
    """Shards of consecutive integer samples from `first`; `drop` maps sample number -> members to leave out."""
    root.mkdir(parents=True, exist_ok=True)
    number, sizes_json = first, {}
    for i, size in enumerate(sizes):
        path = root / f"{name}-{i:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                members = {"txt": f"sample number {number}".encode()}
                if not text_only:
                    members.update(png=_png(number), cls=str(number % 3).encode(),
                                   json=json.dumps({"sha256": f"h{number}"}).encode())
                for ext in (drop or {}).get(number, ()):
                    members.pop(ext)
                for ext, data in sorted(members.items()):
                    info = tarfile.TarInfo(f"{number:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                number += 1
        sizes_json[path.name] = size
    (root / "sizes.json").write_text(json.dumps(sizes_json))
    return str(root / f"{name}-{{{0:06d}..{len(sizes) - 1:06d}}}.tar")


def make_loader(pattern, batch_size=4, rank=0, world=1, workers=2, **kw):
    text_branch = kw.pop("text_branch", None)
    cfg = StreamConfig(shards=(ShardSource(pattern),), batch_size=batch_size, seed=7, shuffle_buffer=8, **kw)
    return image_text_loader(cfg, tokenizer=TOKENIZER, transform=image_transforms(8, train=True), rank=rank,
                             world=world, num_workers=workers, text_branch=text_branch)


def train_overrides(tmp: Path, images: str, text: str, **extra) -> list[str]:
    base = {
        "data.train_shards": images, "data.text_shards": text, "data.batch_size": 4,
        "data.text_batch_size": 4, "data.num_workers": 1, "data.shuffle_buffer": 8, "train.steps": 8,
        "train.checkpoint_every": 3, "train.keep_checkpoints": 5, "train.output_dir": str(tmp / "run"),
        "eval.every": 0, "logging.log_every": 1, "logging.trackers": "[]", "logging.progress": "false",
        "schedule.warmup_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(run: Path, step: int = 3, seed: int = 0):
    """(model, model config, checkpoint dir): a randomly initialised tiny model with both text heads,
    saved as run/checkpoints/step-N the way the trainer saves one (weights + checkpoint.json)."""
    import torch
    from safetensors.torch import save_file

    from mmpretrain.checkpoint.meta import checkpoint_meta
    from mmpretrain.models import build_model, load_model_config
    from mmpretrain.models.heads import Heads

    torch.manual_seed(seed)
    cfg = load_model_config("tiny")
    model = build_model(cfg).eval()
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    (ckpt / "checkpoint.json").write_text(json.dumps(checkpoint_meta(step, cfg, Heads(mlm=True, ar=True))))
    return model, cfg, ckpt
