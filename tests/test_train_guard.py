"""Who may write into a run folder (mmpretrain.train.guard): one trainer per folder (RUN/.lock), and
no process left running once its launcher is gone. The launcher case end to end (accelerate launch,
kill -9 of its process group, resume) is in test_train_loop.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import CONFIG, ROOT, free_port, subprocess_env, train_overrides

from mmpretrain.config import load_config
from mmpretrain.errors import UserError
from mmpretrain.train.guard import LAUNCHER_GONE_EXIT, LOCK_FILE, RunLock

HOST = socket.gethostname()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def _wait_for(condition, seconds: float, what: str) -> float:
    """Poll `condition()` until true; the seconds it took. Fails after `seconds`."""
    start = time.time()
    while not condition():
        assert time.time() - start < seconds, f"{what}: not after {seconds} s"
        time.sleep(0.05)
    return time.time() - start


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=subprocess_env(), **kw)


# -- the lock ----------------------------------------------------------------------------------------
HOLD = """
    import os, signal, sys, time
    from mmpretrain.train.guard import RunLock
    RunLock.acquire(sys.argv[1])
    print("locked", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # no release: what kill -9 leaves behind
    time.sleep(120)
"""


def _hold(run: Path, then: str) -> subprocess.Popen:
    proc = _python(HOLD, str(run), then, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"  # the process ends (or dies) after at most 120 s
    return proc


def test_a_second_lock_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    lock = RunLock.acquire(run)
    holder = json.loads((run / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == HOST
    want = f"run folder {run} is in use by pid {os.getpid()} on host {HOST} since {holder['started']}; wait"
    with pytest.raises(UserError) as e:  # the same process
        RunLock.acquire(run)
    assert str(e.value).startswith(want) and "\n" not in str(e.value)
    other = _python("""
        import sys
        from mmpretrain.train.guard import RunLock
        try:
            RunLock.acquire(sys.argv[1])
        except Exception as e:
            print(e)
        """, str(run), stdout=subprocess.PIPE, text=True)
    out, _ = other.communicate(timeout=60)  # another process: the kernel's record lock says no
    assert out.startswith(want) and out.count("\n") == 1, out
    lock.release()
    assert not (run / LOCK_FILE).exists()
    RunLock.acquire(run).release()


def test_the_lock_of_a_process_that_is_gone_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    dead = _hold(run, "die")
    assert dead.wait(timeout=60) == -signal.SIGKILL
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == dead.pid  # left behind
    lock = RunLock.acquire(run)
    err = capsys.readouterr().err
    assert f"pid {dead.pid} on host {HOST}" in err and "no longer running" in err, err
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_holder_in_another_process_keeps_the_folder(tmp_path):
    run = tmp_path / "run"
    alive = _hold(run, "stay")
    try:
        with pytest.raises(UserError, match=f"in use by pid {alive.pid} on host {HOST}"):
            RunLock.acquire(run)
    finally:
        alive.kill()
        alive.wait(timeout=60)
    RunLock.acquire(run).release()  # gone with its process: no stale note needed to read


def test_a_lock_from_another_host_is_refused_with_what_to_do(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 4321, "host": "gpu-node-7", "started": "2025-01-02T03:04:05+00:00"}))
    with pytest.raises(UserError) as e:
        RunLock.acquire(run)
    message = str(e.value)
    assert message.startswith(f"run folder {run} is in use by pid 4321 on host gpu-node-7 since 2025-01-02T03:04:05")
    assert "cannot be checked" in message and f"delete {run / LOCK_FILE}" in message and "\n" not in message
    assert (run / LOCK_FILE).exists()  # left for the user to decide


def test_the_trainer_releases_the_lock_when_it_ends_and_when_it_raises(shards, tmp_path):
    from mmpretrain.train.trainer import Trainer

    images, text = shards
    args = train_overrides(tmp_path, images, text, **{"train.steps": 1, "train.checkpoint_every": 1})
    Trainer(load_config(ROOT / CONFIG, args)).fit()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with pytest.raises(UserError, match="the loss is"):  # step 2 diverges inside the loop
        Trainer(load_config(ROOT / CONFIG, [*args, "train.steps=2", "train.resume=latest",
                                            "loss.mlm_weight=.inf"])).fit()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock.acquire(tmp_path / "run").release()


def test_a_second_trainer_on_a_running_folder_exits_2_with_one_line(shards, tmp_path):
    images, text = shards
    args = train_overrides(tmp_path, images, text, **{"train.steps": 10_000, "train.checkpoint_every": 0})
    cmd = [sys.executable, "-m", "mmpretrain.train", "--config", CONFIG, *args]
    first = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0 or first.poll() is not None, 300,
                  "the first trainer's first step")
        assert first.poll() is None
        second = subprocess.run([*cmd, "train.resume=latest"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                                text=True, timeout=300)
        assert first.poll() is None  # untouched
    finally:
        first.kill()
        first.wait(timeout=60)
    assert second.returncode == 2
    assert second.stderr.startswith(f"mmpretrain train: error: run folder {tmp_path / 'run'} is in use by pid "
                                    f"{first.pid} on host {HOST} since "), second.stderr
    assert second.stderr.count("\n") == 1, second.stderr


def test_two_processes_on_a_locked_folder_both_end(shards, tmp_path):
    """Only the main process takes the lock; the other one hears the outcome and ends too."""
    images, text = shards
    run = tmp_path / "run"
    holder = _hold(run, "stay")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "mmpretrain.train", "--config", CONFIG,
           *train_overrides(tmp_path, images, text)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert proc.returncode != 0
    line = f"mmpretrain train: error: run folder {run} is in use by pid {holder.pid} on host {HOST} since "
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]  # rank 0's line; rank 1 ends quietly
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written


# -- the launcher ------------------------------------------------------------------------------------
PARENT = """
    import os, subprocess, sys, threading, time
    child, ready = [sys.executable, "-c", sys.argv[1], *sys.argv[2:]], sys.argv[2]

    def start():  # like torch elastic: a session of its own, so only the guard can end it
        with open(ready + ".err", "w") as err:
            subprocess.Popen(child, stderr=err, start_new_session=True)
        deadline = time.time() + 60
        while not os.path.exists(ready) and time.time() < deadline:
            time.sleep(0.05)

    if sys.argv[3] == "from-a-thread":  # Linux sends the parent-death signal when the forking THREAD ends
        threading.Thread(target=start).start()
    else:
        start()
    time.sleep(120)
"""
CHILD = """
    import os, sys, threading, time
    from mmpretrain.train.guard import watch_parent
    if sys.argv[2] == "polling-only":  # off the main thread: no signal handler, the watching thread alone
        threading.Thread(target=watch_parent, args=(os.getppid(),)).start()
        time.sleep(1)
    else:
        watch_parent(os.getppid())
    with open(sys.argv[1] + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(120)
"""


@pytest.mark.parametrize("how", ["signal-and-polling", "polling-only", "from-a-thread"])
def test_a_child_ends_within_a_second_of_its_parent(tmp_path, how):
    ready = tmp_path / "child.pid"
    parent = _python(PARENT, textwrap.dedent(CHILD), str(ready), how)
    try:
        _wait_for(lambda: ready.exists() or parent.poll() is not None, 60, "the child's guard")
        child = int(ready.read_text())
        if how == "from-a-thread":  # the thread that started it ended: that is no launcher death
            time.sleep(1)
            assert _running(child)
    finally:
        parent.kill()
        parent.wait(timeout=60)
    took = _wait_for(lambda: not _running(child), 10, "the orphaned child's exit")
    assert took < 1.5, took
    err = Path(f"{ready}.err").read_text()
    assert err == (f"mmpretrain train: error: rank 0 (pid {child}): the launcher (pid {parent.pid}) is gone; "
                   "stopping without writing more to the run folder (continue with train.resume=latest)\n")


def test_a_parent_that_died_before_the_guard_ends_the_child_at_once():
    """What a launcher killed between our start and the guard looks like: the parent is another pid."""
    proc = subprocess.run([sys.executable, "-c", "import os\nfrom mmpretrain.train.guard import watch_parent\n"
                           "watch_parent(os.getppid() + 1)\nimport time; time.sleep(60)"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == LAUNCHER_GONE_EXIT
    assert proc.stderr.count("\n") == 1 and "is gone; stopping without writing" in proc.stderr
