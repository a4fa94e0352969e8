"""Multi-node rendezvous on one machine: two `accelerate launch --num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1` launchers (one process each) train the tiny model to the end, with
checkpoints and periodic evaluation, and equal a 2-process single-node run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONFIG, ROOT, free_port, subprocess_env, train_overrides

# Timings and wall-clock fields differ between any two runs; everything else must be equal.
_UNTIMED = {"time", "samples_per_s", "data_wait"}


def _launch(machines: int, rank: int, port: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "mmpretrain.train", "--config", CONFIG, *overrides]


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in _UNTIMED}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_machines_equal_two_processes_on_one_machine(shards, tmp_path):
    from safetensors.torch import load_file

    images, text = shards
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\n")  # the test shards' labels: number % 3
    extra = {"eval.classnames": str(tmp_path / "classes.txt"), "train.steps": 6, "train.checkpoint_every": 3, "eval.every": 3, "eval.retrieval_shards": images,
             "eval.zeroshot_shards": images, "eval.text_shards": text}
    single, multi = tmp_path / "single", tmp_path / "multi"
    one = subprocess.run(_launch(1, 0, free_port(), train_overrides(single, images, text, **extra)), cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    port, overrides = free_port(), train_overrides(multi, images, text, **extra)  # one shared run folder
    node0 = subprocess.Popen(_launch(2, 0, port, overrides), cwd=ROOT, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        node1 = subprocess.run(_launch(2, 1, port, overrides), cwd=ROOT, env=subprocess_env(),
                               capture_output=True, text=True, timeout=600)
        out0, err0 = node0.communicate(timeout=600)
    finally:
        node0.kill()
    assert node0.returncode == 0, err0[-3000:]
    assert node1.returncode == 0, node1.stderr[-3000:]
    assert "trained to step 6" in out0 and "trained to step 6" not in node1.stdout  # one main process, on node 0

    a, b = _rows(single / "run"), _rows(multi / "run")
    assert [(r["kind"], r["step"]) for r in b] == [("train", s) for s in (1, 2, 3)] + [("eval", 3)] + [
        ("train", s) for s in (4, 5, 6)] + [("eval", 6)]
    assert b[-1]["retrieval/num_samples"] == 24 and "zeroshot/acc1" in b[-1]  # every task ran on both nodes
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            expected = pytest.approx(x[key], abs=1e-6, rel=0) if isinstance(x[key], float) else x[key]
            assert y[key] == expected, (x["step"], key)
    for step in ("step-00000003", "step-00000006"):
        ckpt_a, ckpt_b = single / "run" / "checkpoints" / step, multi / "run" / "checkpoints" / step
        # both global ranks saved their loader and RNG parts; rank 1 is the process of node 1
        assert sorted(p.name for p in ckpt_b.glob("*_[01].json")) == sorted(p.name for p in ckpt_a.glob("*_[01].json")) == [
            "loader_0.json", "loader_1.json", "rng_0.json", "rng_1.json"]
        wa, wb = load_file(str(ckpt_a / "model.safetensors")), load_file(str(ckpt_b / "model.safetensors"))
        assert wa.keys() == wb.keys()
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
