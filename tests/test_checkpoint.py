"""Checkpoints are JSON and safetensors only: no file of one is ever unpickled (a pickle put in place of
any part is a one-line error, its payload never runs), format-1 checkpoints say how to go on, and a
resume restores weights, AdamW state, schedule, RNG and loader positions exactly, on 1 and 2 processes."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIG, ROOT, free_port, subprocess_env, train_overrides

from mmpretrain.cli import main
from mmpretrain.config import load_config

STEP2, STEP4 = "step-00000002", "step-00000004"


class Payload:
    """Unpickling this creates `path`: what a hostile file in a shared run folder would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _train_args(tmp: Path, images: str, text: str, **extra) -> list[str]:
    base = {"train.steps": 4, "train.checkpoint_every": 2}
    return ["train", "--config", str(ROOT / CONFIG), *train_overrides(tmp, images, text, **{**base, **extra})]


def _eval_args(checkpoint: Path, images: str) -> list[str]:
    return ["eval", "retrieval", "--checkpoint", str(checkpoint), "--shards", images, "--workers", "0",
            "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A 4-step run (checkpoints at steps 2 and 4) and its Trainer, kept for the comparisons."""
    from mmpretrain.train.trainer import Trainer

    images, text = shards
    root = tmp_path_factory.mktemp("straight")
    trainer = Trainer(load_config(ROOT / CONFIG, _train_args(root, images, text)[3:]))
    trainer.fit()
    return root / "run", trainer


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_the_checkpoint_holds_json_and_safetensors_only(trained):
    run, _ = trained
    ckpt = run / "checkpoints" / STEP4
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["checkpoint.json", "loader_0.json", "model.safetensors", "optimizer.json",
                     "optimizer.safetensors", "rng_0.json", "scheduler.json"]
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert meta["version"] == 2 and sorted(meta["parts"]) == names and meta["step"] == 4
    for name in names:
        assert (ckpt / name).stat().st_mode & 0o044 == 0o044, name  # readable by the others sharing the run


def test_a_pickle_in_place_of_any_part_is_refused_and_never_runs(shards, trained, tmp_path, capsys):
    images, text = shards
    run, _ = trained
    original = run / "checkpoints" / STEP4
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()  # the payload is live: unpickling it would leave the marker
    for part in sorted(p.name for p in original.iterdir()):
        copy = tmp_path / part / STEP4
        shutil.copytree(original, copy)
        marker = tmp_path / f"PWNED-{part}"
        (copy / part).write_bytes(pickle.dumps(Payload(marker)))

        resume = [*_train_args(tmp_path / part, images, text, **{"train.steps": 6}), f"train.resume={copy}"]
        assert main(resume) == 2, part
        err = _one_line(capsys)
        assert f"{copy / part}: not a valid checkpoint part" in err and "another checkpoint" in err, err
        assert not marker.exists(), part
        assert not (tmp_path / part / "run" / "checkpoints").exists()  # nothing trained or written

        code = main(_eval_args(copy, images))
        if part in ("checkpoint.json", "model.safetensors"):  # the two files eval reads
            assert code == 2, part
            assert str(copy / part) in _one_line(capsys)
        else:
            assert code == 0, (part, capsys.readouterr().err[-2000:])
            capsys.readouterr()
        assert not marker.exists(), part


def _drop_first_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file(dict(list(tensors.items())[1:]), str(path))


def _shrink_tensors(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.flatten()[:1].clone() for k, v in load_file(str(path)).items()}, str(path))


def _edit_json(edit):
    def apply(path: Path) -> None:
        value = json.loads(path.read_text())
        path.write_text(json.dumps(edit(value)))
    return apply


WRONG_STRUCTURE = {  # valid JSON / safetensors, not what the writer gives
    "checkpoint.json": _edit_json(lambda m: {**m, "version": "two"}),
    "model.safetensors": _drop_first_tensor,
    "optimizer.safetensors": _shrink_tensors,
    "optimizer.json": _edit_json(lambda o: {**o, "param_groups": o["param_groups"][:1]}),
    "scheduler.json": _edit_json(lambda s: {**s, "last_epoch": "4"}),
    "rng_0.json": _edit_json(lambda r: {**r, "torch": r["torch"][:100]}),
    "loader_0.json": _edit_json(lambda p: {name: {**v, "samples": [2]} for name, v in p.items()}),
}


def test_a_part_with_the_wrong_structure_is_a_one_line_error(shards, trained, tmp_path, capsys):
    images, text = shards
    run, _ = trained
    assert sorted(WRONG_STRUCTURE) == sorted(p.name for p in (run / "checkpoints" / STEP4).iterdir())
    for part, damage in WRONG_STRUCTURE.items():
        copy = tmp_path / part / STEP4
        shutil.copytree(run / "checkpoints" / STEP4, copy)
        damage(copy / part)
        resume = [*_train_args(tmp_path / part, images, text, **{"train.steps": 6}), f"train.resume={copy}"]
        assert main(resume) == 2, part
        assert f"{copy / part}: not a valid checkpoint part" in _one_line(capsys), part


def test_a_format_1_checkpoint_says_how_to_continue_and_still_evaluates(shards, trained, tmp_path, capsys):
    images, text = shards
    run, _ = trained
    old = tmp_path / "old" / STEP4
    old.mkdir(parents=True)
    meta = json.loads((run / "checkpoints" / STEP4 / "checkpoint.json").read_text())
    meta["version"] = 1
    del meta["parts"]
    (old / "checkpoint.json").write_text(json.dumps(meta))
    shutil.copy(run / "checkpoints" / STEP4 / "model.safetensors", old)
    marker = tmp_path / "PWNED"
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):  # what accelerate wrote
        (old / name).write_bytes(pickle.dumps(Payload(marker)))
    (old / "loader_0.json").write_text((run / "checkpoints" / STEP4 / "loader_0.json").read_text())

    assert main([*_train_args(tmp_path / "resumed", images, text), f"train.resume={old}"]) == 2
    err = _one_line(capsys)
    assert "predates the safe checkpoint format" in err and f"model.pretrained={old}/model.safetensors" in err, err
    assert main(_eval_args(old, images)) == 0
    capsys.readouterr()
    # what the message proposes works: a new run from its weights
    fresh = _train_args(tmp_path / "fresh", images, text, **{"train.steps": 1})
    assert main([*fresh, f"model.pretrained={old / 'model.safetensors'}"]) == 0
    assert not marker.exists()


@pytest.fixture(scope="module")
def resumed(shards, trained, tmp_path_factory):
    """The same run, resumed from its step-2 checkpoint in a new folder and trained to step 4."""
    from mmpretrain.train.trainer import Trainer

    images, text = shards
    run, _ = trained
    root = tmp_path_factory.mktemp("resumed")
    args = [*_train_args(root, images, text)[3:], f"train.resume={run / 'checkpoints' / STEP2}"]
    trainer = Trainer(load_config(ROOT / CONFIG, args))
    trainer.fit()
    return root / "run", trainer


def test_resume_restores_weights_adamw_state_and_schedule_exactly(trained, resumed):
    """4 steps straight = 2 steps, then a resume from the step-2 checkpoint to step 4."""
    from safetensors.torch import load_file

    (run, straight), (again, after) = trained, resumed
    assert after.step == 4
    want, got = straight.bare_model.state_dict(), after.bare_model.state_dict()
    assert sorted(want) == sorted(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    at_step2 = load_file(str(run / "checkpoints" / STEP2 / "model.safetensors"))
    assert not torch.equal(at_step2["tower.token_embedding.weight"], got["tower.token_embedding.weight"])

    a, b = straight.optimizer.optimizer, after.optimizer.optimizer
    for group_a, group_b in zip(a.param_groups, b.param_groups, strict=True):
        assert {k: v for k, v in group_a.items() if k != "params"} == {k: v for k, v in group_b.items()
                                                                        if k != "params"}
        assert type(group_b["betas"]) is tuple
        for pa, pb in zip(group_a["params"], group_b["params"], strict=True):
            for field in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(b.state[pb][field], a.state[pa][field], atol=1e-6, rtol=0)
    assert sum(float(a.state[p]["exp_avg"].abs().sum()) for g in a.param_groups for p in g["params"]) > 0
    assert after.scheduler.state_dict() == straight.scheduler.state_dict()
    assert after.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    # and what the two runs saved at step 4: the same data position and python/numpy generators
    assert _part(again, STEP4, "loader_0.json") == _part(run, STEP4, "loader_0.json")
    for name in ("python", "numpy"):
        assert _part(again, STEP4, "rng_0.json")[name] == _part(run, STEP4, "rng_0.json")[name], name


def test_the_torch_generator_after_a_resume_is_the_uninterrupted_one(trained, resumed):
    """The loaders draw nothing from the global torch generator (their DataLoader has its own), so
    patch dropout and other model randomness continue exactly after a resume."""
    (run, _), (again, _) = trained, resumed
    assert _part(again, STEP4, "rng_0.json")["torch"] == _part(run, STEP4, "rng_0.json")["torch"]


def _part(run: Path, step: str, name: str):
    return json.loads((run / "checkpoints" / step / name).read_text())


def test_random_generators_come_back_exactly(tmp_path):
    from mmpretrain.checkpoint import rng
    from mmpretrain.checkpoint.parts import read_json, write_json

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # numpy keeps a cached gaussian: part of its state
    write_json(tmp_path / "rng_0.json", rng.capture(torch.device("cpu")))
    want = (random.random(), np.random.randn(), torch.rand(4))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng.parse(read_json(tmp_path / "rng_0.json"), tmp_path / "rng_0.json", torch.device("cpu"))()
    got = (random.random(), np.random.randn(), torch.rand(4))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


# -- two processes -----------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import json, random, shutil, sys
    import numpy as np, torch
    from accelerate import Accelerator
    from pathlib import Path
    from mmpretrain.checkpoint.state import load_checkpoint
    from mmpretrain.cli import main
    from mmpretrain.config import load_config
    from mmpretrain.train.trainer import Trainer

    out, config, straight, resumed = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])

    def report(trainer, tag):
        inner = trainer.optimizer.optimizer
        exp_avg = [inner.state[p]["exp_avg"].sum().item() for g in inner.param_groups for p in g["params"]]
        rank = trainer.accelerator.process_index
        with open(f"{out}/{tag}{rank}.json", "w") as fh:
            json.dump({"weights": {k: v.tolist() for k, v in trainer.bare_model.state_dict().items()},
                       "exp_avg": exp_avg, "lr": trainer.scheduler.get_last_lr(),
                       "draws": [random.random(), float(np.random.rand())]}, fh)

    trainer = Trainer(load_config(config, straight), accelerator=Accelerator(cpu=True))
    rank = trainer.accelerator.process_index
    for _ in range(rank + 1):  # every process's generators in a state of its own before the run
        random.random(), np.random.rand(), torch.rand(1)
    trainer.fit()
    report(trainer, "straight")
    trainer = Trainer(load_config(config, resumed), accelerator=Accelerator(cpu=True))
    load_checkpoint(trainer.accelerator, Path(sys.argv[5]), trainer.build_loaders(), model=trainer.model,
                    optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    with open(f"{out}/restored{rank}.json", "w") as fh:
        json.dump([random.random(), float(np.random.rand()), torch.rand(2).tolist()], fh)
    trainer.fit()  # restores again, then steps 3 and 4
    report(trainer, "resumed")

    # a bad part of process 1 only: every process stops with the same line, none waits in a collective
    broken = Path(out) / "broken"
    if rank == 0:
        shutil.copytree(sys.argv[5], broken)
        state = json.loads((broken / "rng_1.json").read_text())
        (broken / "rng_1.json").write_text(json.dumps({**state, "torch": state["torch"][:100]}))
    trainer.accelerator.wait_for_everyone()
    code = main([*json.loads(sys.argv[6]), f"train.resume={broken}"])
    with open(f"{out}/code{rank}.json", "w") as fh:
        json.dump(code, fh)
    """
)


def test_two_processes_resume_every_rank_exactly(shards, tmp_path):
    """2 gloo processes: 4 steps straight = 2 + resume to 4, and each process gets its own generators
    and data position back (they differ between the processes, so a swap or a lost part would show)."""
    from mmpretrain.checkpoint import rng

    images, text = shards
    step2 = tmp_path / "a" / "run" / "checkpoints" / STEP2
    straight = _train_args(tmp_path / "a", images, text)[3:]
    resumed = [*_train_args(tmp_path / "b", images, text)[3:], f"train.resume={step2}"]
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", str(free_port()),
           str(script), str(tmp_path), str(ROOT / CONFIG), json.dumps(straight), json.dumps(resumed), str(step2),
           json.dumps(_train_args(tmp_path / "c", images, text))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [json.loads((tmp_path / f"code{r}.json").read_text()) for r in range(2)] == [2, 2]
    line = f"mmpretrain train: error: {tmp_path / 'broken' / 'rng_1.json'}: not a valid checkpoint part"
    assert proc.stderr.count(line) == 1, proc.stderr[-4000:]  # printed once, by process 0
    saved = [_part(tmp_path / "a" / "run", STEP2, f"rng_{r}.json") for r in range(2)]
    assert saved[0] != saved[1]
    for rank in range(2):
        rng.parse(saved[rank], step2 / f"rng_{rank}.json", torch.device("cpu"))()
        want = [random.random(), float(np.random.rand()), torch.rand(2).tolist()]
        assert json.loads((tmp_path / f"restored{rank}.json").read_text()) == want, rank

        a = json.loads((tmp_path / f"straight{rank}.json").read_text())
        b = json.loads((tmp_path / f"resumed{rank}.json").read_text())
        for key, value in a["weights"].items():
            torch.testing.assert_close(torch.tensor(b["weights"][key]), torch.tensor(value), atol=1e-6, rtol=0,
                                       msg=key)
        assert b["exp_avg"] == pytest.approx(a["exp_avg"], abs=1e-6, rel=0) and b["lr"] == a["lr"]
        assert b["draws"] == a["draws"], rank  # python and numpy, after the run
        # what each process saved at step 4 after the resume is what it saved straight
        for run in ("a", "b"):
            assert _part(tmp_path / run / "run", STEP4, f"loader_{rank}.json") == _part(
                tmp_path / "a" / "run", STEP4, f"loader_{rank}.json")


FSDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    from accelerate.utils import DistributedType
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from mmpretrain.checkpoint.state import load_checkpoint, save_checkpoint

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # what save/load use of an Accelerator; accelerate's FSDP refuses a machine without GPUs
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, process_index=rank, num_processes=2,
                          is_main_process=rank == 0, device=torch.device("cpu"), scaler=None,
                          wait_for_everyone=dist.barrier)

    def build():  # configs/accelerate/fsdp.yaml: FSDP1, use_orig_params, FULL_STATE_DICT
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 4))
        model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), use_orig_params=True,
                     device_id=torch.device("cpu"))
        FSDP.set_state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(True, True))
        inner = model.module
        optimizer = torch.optim.AdamW([{"params": [inner[0].weight, inner[2].weight], "weight_decay": 0.1},
                                       {"params": [inner[0].bias, inner[1].weight, inner[1].bias, inner[2].bias],
                                        "weight_decay": 0.0}], lr=1e-2, betas=(0.8, 0.9))
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))

    def train(parts, steps, seed):
        model, optimizer, scheduler = parts
        gen = torch.Generator().manual_seed(seed * 10 + rank)
        for _ in range(steps):
            model(torch.randn(5, 8, generator=gen)).pow(2).sum().backward()
            optimizer.step(), scheduler.step(), optimizer.zero_grad()

    straight = build()
    train(straight, 2, 0)
    ckpt = save_checkpoint(acc, Path(sys.argv[1]), 2, {"format": "mmpretrain.checkpoint", "version": 2}, {}, 2,
                           model=straight[0], optimizer=straight[1], scheduler=straight[2])
    train(straight, 2, 1)
    resumed = build()
    load_checkpoint(acc, ckpt, {}, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    train(resumed, 2, 1)
    full = StateDictOptions(full_state_dict=True)
    a, b = (get_model_state_dict(parts[0], options=full) for parts in (straight, resumed))
    if rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump({"diff": max(float((a[k] - b[k]).abs().max()) for k in a), "keys": sorted(a),
                       "betas": type(resumed[1].param_groups[0]["betas"]).__name__}, f)
    dist.barrier()
    dist.destroy_process_group()
    # Even after leaving the group, the interpreter's teardown sometimes meets a gloo/FSDP thread still
    # joinable and aborts ("terminate called without an active exception", SIGABRT; seen twice in full runs on
    # 2 loaded cores), after all the work above is written. Skip that teardown: the outcome is the file.
    sys.stdout.flush(), sys.stderr.flush()
    import os
    os._exit(0)
    """
)


def test_fsdp_checkpoints_resume_exactly(tmp_path):
    """FSDP1 as configs/accelerate/fsdp.yaml sets it, 2 gloo processes: the full weights and AdamW state
    are gathered into the parts and scattered back (the accelerate FSDP path itself needs GPUs)."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), str(tmp_path / "run"), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["diff"] <= 1e-6 and out["betas"] == "tuple"
    ckpt = tmp_path / "run" / "checkpoints" / STEP2
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model.safetensors"))
    assert sorted(weights) == out["keys"] and weights["0.weight"].shape == (6, 8)  # full, bare names
    optim = load_file(str(ckpt / "optimizer.safetensors"))
    assert not torch.equal(optim["0.weight/exp_avg"], optim["0.weight/exp_avg_sq"])


def test_an_epoch_file_does_not_restart_a_run_folder_that_has_checkpoints(tmp_path):
    from mmpretrain.checkpoint.state import find_resume
    from mmpretrain.errors import UserError

    epoch = tmp_path / "epoch_2.pt"
    epoch.write_bytes(b"")  # find_resume only decides where to go on from; the file is read later
    run = tmp_path / "run"
    assert find_resume(str(epoch), run) == epoch  # a new folder: continue from the open_clip_train file
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run / "checkpoints" / "step-00000003" / "checkpoint.json").write_text("{}")
    with pytest.raises(UserError, match="already holds checkpoints \\(newest step-00000003\\); continue them with "
                                        "train.resume=latest"):
        find_resume(str(epoch), run)
