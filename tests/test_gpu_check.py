"""pipelines/bench/gpu_check.sh on a machine without a CUDA GPU: one line saying so, exit 0, nothing run."""

from __future__ import annotations

import subprocess

from helpers import ROOT, subprocess_env


def test_without_a_gpu_the_check_is_one_line_and_exit_0(tmp_path):
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU: the same answer on every machine
    out = subprocess.run(["bash", str(ROOT / "pipelines/bench/gpu_check.sh"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["gpu_check: no CUDA GPU visible to torch here (torch.cuda.is_available() is "
                                       "False); nothing checked"]
    assert not (tmp_path / "o").exists()


def test_without_torch_it_says_how_to_install(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "pipelines/bench/gpu_check.sh")], capture_output=True, text=True,
                         env={**subprocess_env(), "PYTHON": "/usr/bin/false"}, timeout=60)
    assert out.returncode == 2 and "make install" in out.stderr and len(out.stderr.splitlines()) == 1
