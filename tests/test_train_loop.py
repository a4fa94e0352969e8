"""The trainer: 2 processes = 1 process on the same global batch, kill -9 and resume = uninterrupted,
a non-finite loss stops with the last checkpoint intact, checkpoints load for eval and export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import CONFIG, ROOT, free_port, subprocess_env, train_overrides

from mmpretrain.config import load_config
from mmpretrain.errors import UserError


def _losses(run: Path) -> dict[int, float]:
    """step -> loss of metrics.jsonl's train lines; a step logged twice (after a resume) keeps the last."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the line a kill -9 cut short
            continue
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "mmpretrain.train", "--config", CONFIG, *overrides]


@pytest.fixture
def one_thread():
    """The in-process runs use the thread count of the subprocess (OMP_NUM_THREADS=1): float sums in
    another order would differ in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit_in_process(overrides: list[str]) -> None:
    from mmpretrain.train.trainer import Trainer

    Trainer(load_config(ROOT / CONFIG, overrides)).fit()


def test_kill_9_then_resume_gives_the_uninterrupted_losses(shards, tmp_path, one_thread):
    images, text = shards
    _fit_in_process(train_overrides(tmp_path / "a", images, text))
    reference = _losses(tmp_path / "a" / "run")
    assert sorted(reference) == list(range(1, 9))

    killed = train_overrides(tmp_path / "b", images, text)
    run = tmp_path / "b" / "run"
    proc = subprocess.Popen(_train_cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=subprocess_env())
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)  # no handler, no cleanup: what a preempted node looks like
    proc.wait()
    assert (run / "checkpoints" / "step-00000003" / "checkpoint.json").is_file()
    _fit_in_process([*killed, "train.resume=latest"])
    after = _losses(run)
    assert sorted(after) == list(range(1, 9))
    for step in range(1, 9):
        assert after[step] == pytest.approx(reference[step], abs=1e-6, rel=0), step
    assert len({round(v, 6) for v in reference.values()}) > 4  # the losses move: a real comparison


def _launch_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--main_process_port", str(free_port()), *_train_cmd(overrides)[1:]]


def _processes_naming(text: str) -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process whose command line contains `text`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() not in (entry / "cmdline").read_bytes():
                continue
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # ended meanwhile
            continue
        if state != "Z":
            out[int(entry.name)] = int(parent)
    return out


def _written(run: Path) -> tuple[bytes, list[str]]:
    return (run / "metrics.jsonl").read_bytes(), sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc (Linux)")
def test_killing_the_launchers_group_ends_its_ranks_and_resume_gives_the_uninterrupted_losses(shards, tmp_path):
    images, text = shards
    extra = {"train.steps": 40, "train.checkpoint_every": 5}
    whole = subprocess.run(_launch_cmd(train_overrides(tmp_path / "a", images, text, **extra)), cwd=ROOT,
                           env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = _losses(tmp_path / "a" / "run")
    assert sorted(reference) == list(range(1, 41))

    killed = train_overrides(tmp_path / "b", images, text, **extra)
    run = tmp_path / "b" / "run"
    with open(tmp_path / "launcher.err", "w") as err:  # the ranks write to the launcher's stderr
        launcher = subprocess.Popen(_launch_cmd(killed), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)  # like `setsid accelerate launch ...`
    try:
        deadline = time.time() + 300
        while time.time() < deadline and launcher.poll() is None:
            if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= 20:
                break
            time.sleep(0.1)
        assert launcher.poll() is None, f"ended before the kill: {(tmp_path / 'launcher.err').read_text()[-2000:]}"
        ranks = [pid for pid, parent in _processes_naming(str(run)).items() if parent == launcher.pid]
        assert len(ranks) == 2  # the launcher's own children (torch elastic), each in a session of its own
        os.killpg(launcher.pid, signal.SIGKILL)  # the whole group: torch elastic's setsid keeps the ranks out of it
        launcher.wait(timeout=60)  # dead, not only signalled: a loaded machine can take a while to end it
        kept = _written(run)  # what the ranks wrote while the launcher lived
    finally:
        launcher.kill()
        launcher.wait(timeout=60)
    took = 0.0
    while _processes_naming(str(run)):  # the ranks and their DataLoader workers
        assert took < 10, _processes_naming(str(run))
        time.sleep(0.1)
        took += 0.1
    assert _written(run) == kept  # nothing after the kill: no more metrics, no further checkpoint
    assert 20 <= max(_losses(run)) < 40
    err = (tmp_path / "launcher.err").read_text()
    for pid in ranks:
        assert f"(pid {pid}): the launcher (pid {launcher.pid}) is gone; stopping" in err, err[-3000:]

    resumed = subprocess.run(_launch_cmd([*killed, "train.resume=latest"]), cwd=ROOT, env=subprocess_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no longer running; taking the run folder over" in resumed.stderr  # rank 0's lock, left by the kill
    assert not (run / ".lock").exists()
    after = _losses(run)
    assert sorted(after) == list(range(1, 41))
    for step in range(1, 41):
        assert after[step] == pytest.approx(reference[step], abs=1e-6, rel=0), step
    assert len({round(v, 6) for v in reference.values()}) > 20  # the losses move: a real comparison


def test_non_finite_loss_stops_and_the_last_checkpoint_stays_usable(shards, tmp_path, capsys):
    from mmpretrain.checkpoint.load import load_model
    from mmpretrain.cli import main

    images, text = shards
    args = train_overrides(tmp_path, images, text, **{"train.steps": 2, "train.checkpoint_every": 2})
    assert main(["train", "--config", str(ROOT / CONFIG), *args]) == 0
    capsys.readouterr()
    bad = [*args, "train.steps=4", "train.resume=latest", "loss.mlm_weight=.inf"]
    assert main(["train", "--config", str(ROOT / CONFIG), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "step 3: the loss is" in err and "step-00000002" in err, err
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002"]  # nothing half-written, nothing from the bad step
    loaded = load_model(tmp_path / "run")
    assert loaded.step == 2 and loaded.heads.mlm and loaded.heads.ar
    # the same command without train.resume would silently start over on top of it: refused
    assert main(["train", "--config", str(ROOT / CONFIG), *args]) == 2
    assert "train.resume=latest" in capsys.readouterr().err


def test_trainer_checkpoint_exports_to_open_clip_and_logs_to_tensorboard(shards, tmp_path):
    import open_clip

    from mmpretrain.checkpoint.load import load_model
    from mmpretrain.models.export import export_model
    from mmpretrain.train.trainer import Trainer

    images, text = shards
    # the config's default tracker (TensorBoard) stays on here
    cfg = load_config(ROOT / CONFIG, train_overrides(tmp_path, images, text, **{"train.steps": 1, "logging.trackers":
                                                                           '["tensorboard"]'}))
    trainer = Trainer(cfg)
    trainer.fit()
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    loaded = load_model(cfg.train.output_dir)
    out = export_model(loaded.model, loaded.model_config, loaded.heads, tmp_path / "export")
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = trainer.bare_model.eval().encode_image(x)
        torch.testing.assert_close(loaded.model.encode_image(x), want)
        torch.testing.assert_close(reference.eval().encode_image(x, normalize=True), want)


def test_config_errors_are_one_line(tmp_path, capsys):
    from mmpretrain.cli import main

    assert main(["train", "--config", str(ROOT / CONFIG), "train.stpes=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert main(["train", "--config", str(ROOT / CONFIG), "data.train_shards=[]"]) == 2
    assert "data.train_shards is empty" in capsys.readouterr().err


# -- two processes -----------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from accelerate import Accelerator
    from mmpretrain.config import load_config
    from mmpretrain.train.trainer import Trainer
    sys.path.insert(0, sys.argv[3])
    from test_train_loop import global_batches, micro_batches

    out, config = sys.argv[1], sys.argv[2]
    overrides = json.loads(sys.argv[4])
    acc = Accelerator(cpu=True)
    trainer = Trainer(load_config(config, overrides), accelerator=acc)
    losses = []
    for batch in global_batches():
        losses.append(trainer.train_step(micro_batches(batch, acc.process_index, acc.num_processes, 2))["loss"])
    state = {k: v.tolist() for k, v in trainer.bare_model.state_dict().items()}
    # and a real run through the loaders: 2 steps, a checkpoint, an evaluation, on both processes
    fit = Trainer(load_config(config, json.loads(sys.argv[5])), accelerator=Accelerator(cpu=True))
    fit.fit()
    if acc.is_main_process:
        with open(out, "w") as fh:
            json.dump({"losses": losses, "state": state, "world": acc.num_processes, "backend": acc.state.backend,
                       "type": acc.distributed_type.value}, fh)
    """
)


def global_batches(steps: int = 3, size: int = 8) -> list:
    """Fixed global image-text batches with their text-branch tensors (float32, CPU)."""
    from mmpretrain.data.records import ImageTextBatch
    from mmpretrain.data.text.masking import MaskingConfig
    from mmpretrain.data.text.objectives import text_batch
    from mmpretrain.data.text.tokenizer import Tokenizer

    tok = Tokenizer(context_length=32)
    out = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        captions = [f"picture {step} number {i} of a {['red', 'blue', 'green'][i % 3]} thing" for i in range(size)]
        tokens = tok.encode(captions)
        out.append(ImageTextBatch(
            images=torch.randn(size, 3, 64, 64, generator=gen), tokens=tokens.ids, eot_index=tokens.eot_index,
            lengths=tokens.lengths, labels=torch.full((size,), -1), captions=captions,
            text=text_batch(captions, tok, MaskingConfig(), torch.Generator().manual_seed(100 + step))))
    return out


def micro_batches(batch, rank: int, world: int, accum: int) -> list:
    """This process's `accum` micro-batches: rows split by process, then by micro-batch."""
    from dataclasses import fields, replace

    n = len(batch.images) // (world * accum)

    def rows(record, start):
        return replace(record, **{f.name: getattr(record, f.name)[start:start + n] for f in fields(record)
                                  if isinstance(getattr(record, f.name), torch.Tensor)})

    out = []
    for i in range(accum):
        start = (rank * accum + i) * n
        out.append(replace(rows(batch, start), text=rows(batch.text, start)))
    return out


def test_two_processes_equal_one_process_on_the_same_global_batch(shards, tmp_path):
    from accelerate import Accelerator

    from mmpretrain.train.trainer import Trainer

    images, text = shards
    step_overrides = ["train.accum_steps=2", "train.steps=10", f"train.output_dir={tmp_path / 'unused'}",
                      "logging.trackers=[]", "optim.lr=1e-3", "schedule.warmup_steps=1"]
    fit_overrides = train_overrides(tmp_path / "fit", images, text, **{
        "train.steps": 2, "train.checkpoint_every": 1, "eval.every": 2,
        "eval.retrieval_shards": images, "eval.zeroshot_shards": "[]", "eval.text_shards": text})
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    # launched with the shipped CPU config: this is also the test that the file gives 2 gloo processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", str(free_port()),
           str(script), str(tmp_path / "two.json"), str(ROOT / CONFIG),
           str(Path(__file__).parent), json.dumps(step_overrides), json.dumps(fit_overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert (two["world"], two["type"], two["backend"]) == (2, "MULTI_CPU", "gloo")

    trainer = Trainer(load_config(ROOT / CONFIG, step_overrides), accelerator=Accelerator(cpu=True))
    one = [trainer.train_step(micro_batches(b, 0, 1, 2))["loss"] for b in global_batches()]
    assert two["losses"] == pytest.approx(one, abs=1e-5, rel=0)
    assert one[0] != pytest.approx(one[-1], abs=1e-3)  # the weights moved between steps
    for key, value in trainer.bare_model.state_dict().items():
        torch.testing.assert_close(torch.tensor(two["state"][key], dtype=value.dtype), value, atol=1e-5, rtol=0,
                                   msg=key)
    # the 2-process fit: a checkpoint per step (both processes' loader positions), one eval line
    run = tmp_path / "fit" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000002").glob("loader_*.json")) == [
        "loader_0.json", "loader_1.json"]
    from mmpretrain.checkpoint.load import load_model

    assert load_model(run).step == 2  # a DDP run's checkpoint loads for eval/export like a 1-process one
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["retrieval/num_samples"] == 24 and evals[0]["text/num_texts"] == 18


def test_text_weight_warm_down_weights_each_logged_step(shards, tmp_path, one_thread):
    """loss.text_weight_end=0: every step's loss is clip + factor x (mlm + ar), the factor a cosine from
    1 at the first step to 0 at the last, and the text heads still train (their loss is in the graph)."""
    images, text = shards
    _fit_in_process(train_overrides(tmp_path, images, text, **{"train.steps": 5, "train.checkpoint_every": 0,
                                                                  "loss.text_weight_end": 0}))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["text_weight"] for r in train] == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)
    for r in train:
        assert r["mlm_loss"] > 1 and r["ar_loss"] > 1  # computed and logged at any weight
        assert r["loss"] == pytest.approx(r["clip_loss"] + r["text_weight"] * (r["mlm_loss"] + r["ar_loss"]),
                                          rel=1e-5)


def test_unknown_tracker_is_a_config_error(tmp_path):
    from mmpretrain.train.runlog import check_trackers

    with pytest.raises(UserError, match="not installed"):
        check_trackers(["surely_not_a_tracker_package"])


def test_the_user_recipe_trains_with_only_train_shards_and_says_what_is_off(shards, tmp_path, capsys):
    """configs/train/my-data.yaml with data.train_shards plus only what shrinks it for a CPU test."""
    from mmpretrain.cli import main

    images, _ = shards
    recipe = str(ROOT / "configs" / "train" / "my-data.yaml")
    assert main(["train", "--config", recipe]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.train_shards is empty" in err
    shrink = ["model.name=tiny", "data.context_length=32", "data.batch_size=4", "data.text_batch_size=4",
              "data.num_workers=0", "train.steps=2", "train.precision=fp32", "schedule.warmup_steps=1",
              "logging.trackers=[]", "logging.progress=false", f"train.output_dir={tmp_path / 'run'}"]
    assert main(["train", "--config", recipe, f"data.train_shards={images}", *shrink]) == 0
    err = capsys.readouterr().out
    off = [line for line in err.splitlines() if line.startswith("mmpretrain train: off: ")]
    assert [line.split(": off: ")[1].split(" (")[0] for line in off] == ["text corpus", "periodic eval"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == 2
    assert all(r["kind"] != "eval" for r in rows)
    assert rows[-1]["mlm_tokens"] > 0 and rows[-1]["ar_tokens"] > 0  # the heads learn from the captions
