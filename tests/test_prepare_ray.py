"""`prepare --engine ray` on a real local Ray cluster of two nodes with one CPU each (ray.cluster_utils,
started and shut down here): the same bytes as the local engine (several blocks, failures, --dedupe
with copies in other blocks), also when a worker node dies mid-run; without Ray, one line says how to
install it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
from helpers import ROOT, subprocess_env
from PIL import Image
from ray.cluster_utils import Cluster
from test_prepare_pipeline import QUIET, counts, make_folder, tree_digest

from mmpretrain.cli import main

ARGS = ["--shard-size", "10", "--val-fraction", "0.2", "--name", "x", *QUIET]


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_engine_writes_the_local_engines_bytes(cluster, tmp_path, capsys):
    make_folder(tmp_path / "src", 90, duplicates=25)
    for broken in ("part0/img0006.jpg", "part1/img0031.jpg"):
        (tmp_path / "src" / broken).write_bytes(b"not an image")
    args = ["prepare", str(tmp_path / "src"), *ARGS, "--dedupe"]
    assert main([*args, "--out", str(tmp_path / "local"), "--workers", "2"]) == 0
    local_err = capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "ray"), "--engine", "ray", "--ray-address", cluster.address]) == 0
    ray_err = capsys.readouterr().err
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")
    expected = counts(tmp_path / "local")
    assert counts(tmp_path / "ray") == expected
    assert expected["failed"] == 2 and expected["deduplicated"] > 0
    assert not (tmp_path / "ray" / ".prepare").exists() and not list((tmp_path / "ray").rglob("*.tmp"))
    assert ray_err == local_err  # nothing more on stderr (the bar is off with --no-progress)


def test_ray_progress_counts_samples_and_failures(cluster, tmp_path, monkeypatch):
    """The bar the local engine shows: "prepare", in samples, with failed=N; here fed block by block."""
    from tqdm import tqdm

    make_folder(tmp_path / "src", 30)
    (tmp_path / "src" / "part0" / "img0002.jpg").write_bytes(b"not an image")
    bars, updates, postfixes = [], [], []
    init, update, set_postfix = tqdm.__init__, tqdm.update, tqdm.set_postfix
    monkeypatch.setattr(tqdm, "__init__", lambda self, *a, **kw: (bars.append(kw), init(self, *a, **kw))[1])
    monkeypatch.setattr(tqdm, "update", lambda self, n=1: (updates.append(n), update(self, n))[1])
    monkeypatch.setattr(tqdm, "set_postfix", lambda self, *a, **kw: (postfixes.append(kw), set_postfix(self, *a, **kw))[1])
    for engine in ("local", "ray"):
        bars.clear()
        updates.clear()
        postfixes.clear()
        assert main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / engine), "--shard-size", "10",
                     "--image-size", "32", "--engine", engine, "--ray-address", cluster.address]) == 0
        assert [(b["desc"], b["unit"]) for b in bars] == [("prepare", "sample")], engine
        assert sum(updates) == 30, engine
        assert postfixes and postfixes[-1]["failed"] == 1, engine


# -- a worker node dies mid-run -----------------------------------------------------------------------
def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class SlowImages(BaseHTTPRequestHandler):
    """/N.jpg: image N after DELAY seconds (so blocks take a while and one can be cut); /missing: 404."""

    DELAY = 0.05

    def do_GET(self):
        name = self.path.strip("/")
        if not name.endswith(".jpg"):
            self.send_error(404)
            return
        time.sleep(self.DELAY)
        body = _jpeg(int(name[:-4]))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def url_manifest(tmp_path):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    path = tmp_path / "urls.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["url", "caption"])
        for i in range(120):
            writer.writerow([f"{base}/{i}.jpg" if i % 17 else f"{base}/missing", f"picture number {i}"])
    try:
        yield path
    finally:
        httpd.shutdown()
        httpd.server_close()


def _running_a_block(node) -> bool:
    """Whether a Ray worker of this cluster node is inside process_block now (Ray titles a worker
    process after the task it runs), so removing the node cuts a block for sure, rather than a lease
    whose worker has not started yet (which Ray reschedules without a retry)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    try:
        return any(p.name() == "ray::process_block" for p in raylet.children(recursive=True))
    except psutil.NoSuchProcess:  # a worker that just ended
        return False


def test_a_worker_node_dying_mid_run_changes_nothing(cluster, url_manifest, tmp_path, capfd):
    """The second node is removed once some block is done and it is running another; Ray reruns its
    tasks on the head node, and the output is the local engine's."""
    args = ["prepare", str(url_manifest), *ARGS, "--threads", "2", "--retries", "0"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    # stats.json's time covers the downloads: 112 delayed answers on 2 threads take at least this long
    stats = json.loads((tmp_path / "local" / "stats.json").read_text())
    assert stats["elapsed_s"] >= 112 * SlowImages.DELAY / 2
    out = tmp_path / "ray"
    worker = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    blocks = out / ".prepare" / "blocks"
    removed = threading.Event()

    def remove_when_started():
        deadline = time.time() + 120
        while time.time() < deadline:
            if blocks.is_dir() and any(p.suffix == ".json" for p in blocks.iterdir()) and _running_a_block(worker):
                cluster.remove_node(worker, allow_graceful=False)
                removed.set()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=remove_when_started)
    killer.start()
    code = main([*args, "--out", str(out), "--engine", "ray", "--ray-address", cluster.address])
    killer.join()
    assert removed.is_set(), "the second node ran no block after the first finished; slow the server down"
    assert code == 0
    assert tree_digest(out) == tree_digest(tmp_path / "local")
    assert counts(out) == counts(tmp_path / "local") and counts(out)["failed"] == 8
    assert not list(out.rglob("*.tmp"))
    # Ray's own word that a block was cut on the dead node and is made again
    assert "Task process_block failed. There are 3 retries remaining, so the task will be retried" in \
        "".join(capfd.readouterr())


def test_without_ray_the_engine_says_how_to_install_it(tmp_path):
    """A `ray` that cannot be imported (a package on the path that raises ImportError, as a missing
    one does): exit 2, one line, nothing written."""
    blocker = tmp_path / "noray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    make_folder(tmp_path / "src", 4)
    env = {**subprocess_env(), "PYTHONPATH": str(blocker.parent)}
    proc = subprocess.run([sys.executable, "-m", "mmpretrain", "prepare", str(tmp_path / "src"), "--out",
                           str(tmp_path / "out"), "--engine", "ray", *QUIET], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mmpretrain prepare: error: --engine ray needs Ray: pip install 'mmpretrain-clip[ray]'"]
    assert not Path(tmp_path / "out").exists()
