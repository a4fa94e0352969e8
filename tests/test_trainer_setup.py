"""What the trainer builds before the first step: the SigLIP start, the model evaluation runs on, the
device choice, and the typed batches it moves to the device."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmpretrain import runtime
from mmpretrain.config import load_config
from mmpretrain.data.records import ImageTextBatch, SentencePairs, TextBatch
from mmpretrain.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/train/tiny.yaml"


def _trainer(tmp_path, *overrides) -> Trainer:
    cfg = load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", "logging.trackers=[]", *overrides])
    return Trainer(cfg)


def test_siglip_starts_at_the_papers_scale_and_bias(tmp_path):
    tower = _trainer(tmp_path, "loss.contrastive=siglip").bare_model.tower
    assert tower.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-6)  # not CLIP's 1/0.07
    assert tower.logit_bias.item() == -10.0
    clip = _trainer(tmp_path).bare_model.tower
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5) and clip.logit_bias is None


def test_the_unsharded_copy_evaluates_like_the_trained_model(tmp_path):
    """Under FSDP evaluation runs on a copy built from the gathered full state; here the same code on
    a plain module must give a model with identical weights and outputs."""
    trainer = _trainer(tmp_path)
    with torch.no_grad():
        for p in trainer.model.parameters():  # weights that differ from a fresh build
            p.add_(0.01 * torch.randn_like(p))
    copy = trainer.unsharded_copy()
    assert copy is not trainer.bare_model
    for (name, a), (_, b) in zip(trainer.bare_model.state_dict().items(), copy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 1000, (2, 32))
    eot = torch.tensor([5, 31])
    with torch.no_grad():
        want = trainer.bare_model.eval()(images, tokens, eot)
        got = copy.eval()(images, tokens, eot)
    torch.testing.assert_close(got.image_features, want.image_features, rtol=0, atol=0)
    torch.testing.assert_close(got.text_features, want.text_features, rtol=0, atol=0)
    assert trainer.eval_model() is trainer.bare_model  # not FSDP: no copy


def test_cpu_only_when_torch_sees_no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # an MPS/XPU/CUDA machine
    assert runtime.accelerator_available() is True
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    acc = runtime.make_accelerator("fp32")  # accelerate's state is per process: the precision the trainers above used
    assert acc.device.type == "cpu" and acc.mixed_precision == "no"
    assert runtime.MIXED_PRECISION == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def test_records_move_every_tensor_and_keep_the_rest():
    text = TextBatch(*(torch.zeros(2, 4, dtype=torch.long) for _ in range(4)), attention_mask=torch.ones(2, 4, dtype=torch.bool),
                     eot_index=torch.tensor([3, 3]), lengths=torch.tensor([4, 4]),
                     pairs=SentencePairs(*(torch.zeros(2, 4, dtype=torch.long) for _ in range(3)),
                                         eot_index=torch.tensor([3, 3]), labels=torch.tensor([0, 1])),
                     texts=["a", "b"], keys=["0", "1"])
    batch = ImageTextBatch(images=torch.zeros(2, 3, 8, 8), tokens=torch.zeros(2, 4, dtype=torch.long),
                           eot_index=torch.tensor([3, 3]), lengths=torch.tensor([4, 4]), labels=torch.tensor([-1, 2]),
                           keys=["0", "1"], captions=["a", "b"], sources=[("s.tar", 0), ("s.tar", 1)], text=text)
    moved = batch.to("meta")
    assert moved is not batch and batch.images.device.type == "cpu"  # a new record; the old one is untouched
    tensors = [moved.images, moved.tokens, moved.labels, moved.text.mlm_labels, moved.text.pairs.labels]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.keys == ["0", "1"] and moved.sources == batch.sources and moved.text.texts == ["a", "b"]
    assert len(moved) == 2 and len(moved.text) == 2
    assert math.isclose(float(batch.to("cpu").labels[1]), 2.0)


_FAULTS = """
import json, resource, sys, torch
from mmpretrain import runtime
if sys.argv[1] == "keep":
    assert runtime.keep_freed_memory()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(12_500_000)  # 50 MB, over glibc's largest default mmap threshold (32 MB)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="glibc's allocator (Linux) only")
def test_keep_freed_memory_stops_the_page_faults_of_a_block_allocated_every_step():
    """What the CPU trainer sets up: a 50 MB tensor allocated and freed ten times faults its 12,200
    pages in every time by default (glibc unmaps it on free); once freed memory is kept, the first
    few blocks grow the heap and the rest reuse it without a fault."""
    import json
    import subprocess
    import sys

    faults = {mode: json.loads(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                                              text=True, check=True).stdout) for mode in ("default", "keep")}
    assert min(faults["default"]) > 10_000, faults
    assert max(faults["keep"][5:]) < 200, faults
