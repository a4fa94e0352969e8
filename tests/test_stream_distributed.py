"""Two real processes under `accelerate launch` (gloo on CPU), uneven shards, a collective every
batch: a rank with one batch fewer would hang the other, so finishing proves equal counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from helpers import free_port, write_shards

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from mmpretrain.data.loader import image_text_loader
    from mmpretrain.shards.resolve import ShardSource
    from mmpretrain.data.stream import StreamConfig
    from mmpretrain.data.text.tokenizer import Tokenizer
    from mmpretrain.data.transforms import image_transforms

    out = sys.argv[1]
    acc = Accelerator(cpu=True)
    for mode, pattern in (("epoch", sys.argv[2]), ("resampled", sys.argv[3])):
        cfg = StreamConfig(shards=(ShardSource(pattern),), batch_size=3, seed=5, mode=mode,
                           samples_per_epoch=60 if mode == "resampled" else None)
        loader = image_text_loader(cfg, tokenizer=Tokenizer(context_length=12),
                                   transform=image_transforms(8, True), rank=acc.process_index,
                                   world=acc.num_processes, num_workers=2)
        keys, sizes = [], []
        for batch in loader:  # deliberately NOT accelerator.prepare(loader)
            size = torch.tensor([len(batch.keys)])
            dist.all_reduce(size)  # a collective per batch, as a DDP step has
            sizes.append(int(size))
            keys += batch.keys
        with open(f"{out}/{mode}{acc.process_index}.json", "w") as fh:
            json.dump({"world": acc.num_processes, "type": str(acc.distributed_type), "keys": keys,
                       "sizes": sizes, "len": len(loader)}, fh)
    """
)



def test_two_processes_under_accelerate_launch(tmp_path):
    epoch_pattern = write_shards(tmp_path / "e", [2, 17, 1, 9, 4])  # 33 samples, 5 uneven shards
    resampled_pattern = write_shards(tmp_path / "r", [5, 3])
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), str(tmp_path), epoch_pattern, resampled_pattern]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch = [json.loads((tmp_path / f"epoch{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and "MULTI_CPU" in r["type"] for r in epoch)
    assert len(epoch[0]["sizes"]) == len(epoch[1]["sizes"]) == epoch[0]["len"] == 33 // 6
    keys = epoch[0]["keys"] + epoch[1]["keys"]
    assert len(keys) == len(set(keys)) == 30  # distinct across ranks; only the last partial global batch left

    resampled = [json.loads((tmp_path / f"resampled{r}.json").read_text()) for r in range(2)]
    assert len(resampled[0]["sizes"]) == len(resampled[1]["sizes"]) == 10  # 60 samples / (2 ranks x 3)
    assert resampled[0]["keys"] != resampled[1]["keys"]  # each rank draws its own stream
