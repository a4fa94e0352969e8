"""configs/accelerate/*.yaml: what accelerate 1.x makes of each file, and one real 2-process CPU launch.

The GPU files cannot run here (no GPU); these tests go as far as accelerate's own loader, launcher
argument handling and FSDP plugin go without one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"

# file: (distributed_type, num_machines, num_processes in all, mixed_precision)
EXPECTED = {
    "cpu-2proc.yaml": (DistributedType.MULTI_GPU, 1, 2, "no"),
    "1gpu.yaml": (DistributedType.NO, 1, 1, "bf16"),
    "8gpu.yaml": (DistributedType.MULTI_GPU, 1, 8, "bf16"),
    "multinode.yaml": (DistributedType.MULTI_GPU, 2, 16, "bf16"),
    "fsdp.yaml": (DistributedType.FSDP, 1, 8, "bf16"),
    "deepspeed-zero2.yaml": (DistributedType.DEEPSPEED, 1, 8, "bf16"),
}


def test_every_file_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_loads_it(name):
    cfg = load_config_from_file(str(CONFIGS / name))  # accelerate's loader: unknown keys are errors there
    distributed_type, machines, processes, precision = EXPECTED[name]
    assert (cfg.distributed_type, cfg.num_machines, cfg.num_processes, cfg.mixed_precision) == \
        (distributed_type, machines, processes, precision)
    if name == "fsdp.yaml":
        assert cfg.fsdp_config["fsdp_version"] == 1
        assert cfg.fsdp_config["fsdp_reshard_after_forward"] == "FULL_SHARD"
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name == "deepspeed-zero2.yaml":
        assert cfg.deepspeed_config["zero_stage"] == 2
        assert cfg.deepspeed_config["gradient_clipping"] == 1.0  # = optim.grad_clip's default


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_names_its_launch_command(name):
    text = (CONFIGS / name).read_text()
    assert f"accelerate launch --config_file configs/accelerate/{name}" in text
    train_config = re.search(r"-m mmpretrain\.train --config (configs/train/\S+\.yaml)", text)
    assert train_config and (ROOT / train_config.group(1)).is_file()
    named_test = re.search(r"tests/(test_\w+\.py)", text)  # each header says where it is tested
    assert named_test and (ROOT / "tests" / named_test.group(1)).is_file()
    if name != "cpu-2proc.yaml":
        prose = " ".join(line.lstrip("#").strip() for line in text.splitlines())
        assert "written from accelerate's documented schema, not yet run" in prose


def _launch_args(*argv: str):
    """What `accelerate launch ARGV script.py` resolves before starting anything (accelerate's own code)."""
    args = launch_command_parser().parse_args([*argv, "script.py"])
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launcher_reads_it(name):
    args = _launch_args("--config_file", str(CONFIGS / name))
    distributed_type, machines, processes, precision = EXPECTED[name]
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (processes, machines, precision)
    assert args.multi_gpu == (distributed_type == DistributedType.MULTI_GPU)
    assert args.use_fsdp == (distributed_type == DistributedType.FSDP)
    assert args.use_deepspeed == (distributed_type == DistributedType.DEEPSPEED)


def test_multinode_takes_rank_and_address_from_the_command_line():
    args = _launch_args("--config_file", str(CONFIGS / "multinode.yaml"), "--machine_rank", "1",
                        "--main_process_ip", "10.1.2.3", "--main_process_port", "29555")
    assert (args.machine_rank, args.main_process_ip, args.main_process_port) == (1, "10.1.2.3", 29555)
    assert (args.num_machines, args.num_processes) == (2, 16)


def test_fsdp_plugin_accepts_what_the_launcher_passes_on():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy, StateDictType

    env = prepare_multi_gpu_env(_launch_args("--config_file", str(CONFIGS / "fsdp.yaml")))
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    env["FSDP_SYNC_MODULE_STATES"] = "false"  # with it, the plugin asks for a GPU at construction
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT and plugin.use_orig_params
    assert plugin.backward_prefetch == BackwardPrefetch.BACKWARD_PRE
    assert plugin.transformer_cls_names_to_wrap == ["ResidualAttentionBlock"]


def test_fsdp_wraps_every_transformer_layer_of_both_towers():
    """The class name in fsdp.yaml is the layer of open_clip's vision and text transformers (accelerate
    matches it by exact class name; a miss would be an error at prepare time, on the cluster)."""
    from mmpretrain.models import load_model_config
    from mmpretrain.models.multitask import build_model

    cfg = load_model_config("tiny")
    model = build_model(cfg)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ResidualAttentionBlock"]
    assert sum(n.startswith("tower.visual.") for n in blocks) == cfg["vision_cfg"]["layers"]
    assert sum(n.startswith("tower.transformer.") for n in blocks) == cfg["text_cfg"]["layers"]
    assert model.tower.logit_scale.ndim == 0  # why fsdp.yaml uses FSDP1: FSDP2 refuses scalar parameters


# The cpu-2proc.yaml launch itself runs in tests/test_train_loop.py (the trainer's 2-process test
# is started with this file and asserts MULTI_CPU, 2 processes, gloo).



def _cpu_launch(launch_args: list[str], *command: str):
    import subprocess
    import sys

    from helpers import free_port, subprocess_env

    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(free_port()), *command]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())


def test_the_fsdp_file_on_a_cpu_machine_is_one_line(tmp_path, shards):
    """accelerate's FSDP plugin raises on a machine without GPUs (sync_module_states); training says
    so in one line, naming the CPU launch file."""
    from helpers import CONFIG, train_overrides

    images, text = shards
    proc = _cpu_launch(["--config_file", str(CONFIGS / "fsdp.yaml")], "-m", "mmpretrain.train",
                       "--config", CONFIG, *train_overrides(tmp_path, images, text))
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("mmpretrain train: error:")]
    assert said == ["mmpretrain train: error: this launch asks for FSDP, which needs a GPU or another accelerator "
                    "(accelerate: FSDP parameter initialization with `sync_module_states=True` is not supported "
                    "on cpu.); on CPU launch with --config_file configs/accelerate/cpu-2proc.yaml"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_flags_on_a_cpu_machine_say_the_run_is_ddp(tmp_path):
    """Without sync_module_states accelerate drops the FSDP request on CPU (MULTI_CPU is never promoted
    to FSDP) without a word; the run says so, once."""
    script = tmp_path / "which.py"
    # one write per line: the two ranks share the pipe, and print() writes its arguments separately
    script.write_text("import os\nfrom mmpretrain.runtime import make_accelerator\na = make_accelerator()\n"
                      "os.write(1, f'type {a.process_index} {a.distributed_type.value}\\n'.encode())\n")
    proc = _cpu_launch(["--use_fsdp", "--fsdp_version", "2"], str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("type")) == [
        "type 0 MULTI_CPU", "type 1 MULTI_CPU"]
    said = [line for line in proc.stderr.splitlines() if "FSDP was asked for" in line]
    assert said == ["mmpretrain: FSDP was asked for, but accelerate runs FSDP on GPUs and other accelerators only; "
                    "this run is MULTI_CPU: every process holds all weights, and the updates are FSDP's up to "
                    "float rounding"]
