"""The checks that need a CUDA GPU (marker `cuda`): pipelines/bench/gpu_check.sh runs them on one.
Without a GPU every test here is skipped with that reason, in every run's summary (-ra): nothing
here counts as passing on a CPU machine."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIG, ROOT, train_overrides

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pipelines/bench/gpu_check.sh)")]


@pytest.fixture(autouse=True)
def exact_matmul():
    """fp32 comparisons with the CPU need full-precision matmuls (no TF32)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tiled_infonce_on_cuda_equals_the_float64_reference():
    from mmpretrain.losses.contrastive import clip_loss

    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(1000, 64, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(1000, 64, generator=gen, dtype=torch.float64), dim=1)
    scale = torch.tensor(30.0, dtype=torch.float64)

    def loss_and_grads(i, t, s, **kw):
        i, t, s = (x.clone().requires_grad_() for x in (i, t, s))
        loss = clip_loss(i, t, s, **kw)["loss"]
        loss.backward()
        return [x.detach().cpu().double() for x in (loss, i.grad, t.grad, s.grad)]

    want = loss_and_grads(img, txt, scale)
    for tile in (None, 128, 333):
        got = loss_and_grads(img.float().cuda(), txt.float().cuda(), scale.float().cuda(), tile_size=tile)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_training_on_cuda_follows_the_cpu_run(shards, tmp_path):
    """The same 4 steps on the GPU (fp32) and on the CPU: the same losses up to float rounding."""
    from accelerate import Accelerator

    from mmpretrain.config import load_config
    from mmpretrain.train.trainer import Trainer

    images, text = shards
    losses = {}
    for where, cpu in (("cuda", False), ("cpu", True)):
        cfg = load_config(ROOT / CONFIG, train_overrides(tmp_path / where, images, text, **{
            "train.steps": 4, "train.checkpoint_every": 4, "data.num_workers": 0, "optim.fused": "true"}))
        trainer = Trainer(cfg, accelerator=Accelerator(cpu=cpu))
        assert trainer.accelerator.device.type == where
        trainer.fit()
        rows = [json.loads(line) for line in (tmp_path / where / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[where] = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_checkpoints_and_evaluates(shards, tmp_path, precision):
    from mmpretrain.checkpoint.load import load_model
    from mmpretrain.cli import main

    images, text = shards
    args = train_overrides(tmp_path, images, text, **{
        "train.steps": 6, "train.checkpoint_every": 3, "train.precision": precision, "eval.every": 3,
        "eval.retrieval_shards": images, "eval.text_shards": text, "data.num_workers": 0})
    assert main(["train", "--config", str(ROOT / CONFIG), *args]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]
    assert load_model(tmp_path / "run").step == 6


def test_evaluation_on_cuda_equals_the_cpu(shards):
    from mmpretrain.eval.evaluator import EvalSettings, Evaluator
    from mmpretrain.models import build_model, load_model_config

    images, _ = shards
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    settings = EvalSettings(batch_size=8, num_workers=0, progress=False)
    cpu = Evaluator(model, cfg, settings=settings).embed([images], texts=True)
    gpu = Evaluator(model.cuda(), cfg, device="cuda", settings=settings).embed([images], texts=True)
    assert gpu.sources == cpu.sources and gpu.captions == cpu.captions  # the same rows, in the same order
    torch.testing.assert_close(gpu.image, cpu.image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gpu.text, cpu.text, atol=1e-5, rtol=1e-4)
