"""Every loss on two real gloo processes under `accelerate launch` against the 1-process full batch.

Each rank builds the same seeded float64 data and a tiny linear "tower", computes the full-batch
loss and gradients locally with the naive formula, then its own slice through our loss, and
averages parameter gradients over ranks as DDP does. Both must agree to 1e-6.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from accelerate import Accelerator
    from mmpretrain.losses import all_gather_with_grad, clip_loss, rank_and_world, siglip_loss, token_loss

    acc = Accelerator(cpu=True)
    rank, world = rank_and_world()
    torch.set_default_dtype(torch.float64)
    results = {"rank": rank, "world": world, "process_index": acc.process_index}

    def ddp_average(loss, grads):
        # what DDP does: average gradients; the logged loss is the mean of the per-rank losses
        packed = torch.cat([loss.detach().reshape(1)] + [g.reshape(-1) for g in grads])
        dist.all_reduce(packed)
        return packed / world

    def compare(name, full_loss, full_grads, loss, grads):
        mine = ddp_average(loss, grads)
        want = torch.cat([full_loss.detach().reshape(1)] + [g.reshape(-1) for g in full_grads])
        results[name] = {"loss": abs(float(mine[0] - want[0])), "grad": float((mine[1:] - want[1:]).abs().max()),
                         "value": float(want[0])}

    def grads_of(loss, params):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    def naive_clip(img, txt, s, b):
        logits = s * img @ txt.T
        target = torch.arange(len(img))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def naive_siglip(img, txt, s, b):
        signs = 2 * torch.eye(len(img)) - 1
        return -F.logsigmoid(signs * (s * img @ txt.T + b)).sum() / len(img)

    def contrastive_case(name, sizes, loss_fn, naive_fn):
        g = torch.Generator().manual_seed(7)
        total = sum(sizes)
        x_img, x_txt = torch.randn(total, 6, generator=g), torch.randn(total, 4, generator=g)
        init = [torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g), torch.tensor(2.0), torch.tensor(-3.0)]

        def run(x_i, x_t, fn):
            params = [p.clone().requires_grad_() for p in init]  # w_img, w_txt, log_scale, bias
            img, txt = F.normalize(x_i @ params[0], dim=1), F.normalize(x_t @ params[1], dim=1)
            loss = fn(img, txt, params[2].exp(), params[3])
            return loss, grads_of(loss, params)

        full_loss, full_grads = run(x_img, x_txt, naive_fn)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        loss, grads = run(x_img[lo:hi], x_txt[lo:hi], lambda *a: loss_fn(*a)["loss"])
        compare(name, full_loss, full_grads, loss, grads)

    clip = lambda **kw: (lambda i, t, s, b: clip_loss(i, t, s, **kw))
    for sizes in ([7, 7], [5, 3]):
        tag = "-".join(map(str, sizes))
        contrastive_case(f"clip_global_{tag}", sizes, clip(), naive_clip)
        contrastive_case(f"tiled_global_{tag}", sizes, clip(tile_size=3), naive_clip)
    contrastive_case("clip_local", [7, 7], clip(local_loss=True), naive_clip)
    contrastive_case("tiled_local", [7, 7], clip(local_loss=True, tile_size=3), naive_clip)
    contrastive_case("siglip", [7, 7], siglip_loss, naive_siglip)

    # token loss: rank 0 holds 3 predicted tokens, rank 1 holds 17, so the global count matters
    g = torch.Generator().manual_seed(3)
    vocab, seqs, length = 7, 8, 5
    x = torch.randn(seqs, length, 4, generator=g)
    labels = torch.randint(0, vocab, (seqs, length), generator=g)
    keep = torch.zeros(seqs, length, dtype=torch.bool)
    keep[:4].view(-1)[[0, 7, 13]] = True
    keep[4:].view(-1)[:17] = True
    labels[~keep] = -100
    init = [torch.randn(4, 3, generator=g), torch.randn(vocab, 3, generator=g), torch.randn(vocab, generator=g)]

    def token_run(xs, ys, micro, **kw):
        params = [p.clone().requires_grad_() for p in init]  # tower, tied embedding, bias
        outs = [token_loss(torch.tanh(xm @ params[0]), params[1], ym, bias=params[2], chunk_size=2, **kw)
                for xm, ym in zip(xs.chunk(micro), ys.chunk(micro))]
        loss = sum(o["loss"] for o in outs)  # gradient accumulation: the micro-step losses add up
        return loss, grads_of(loss, params), outs

    full_params = [p.clone().requires_grad_() for p in init]
    logits = torch.tanh(x @ full_params[0]) @ full_params[1].T + full_params[2]
    full_loss = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))
    full_grads = grads_of(full_loss, full_params)
    full_acc = float((logits.argmax(-1)[keep] == labels[keep]).double().mean())
    mine = slice(0, 4) if rank == 0 else slice(4, 8)
    loss, grads, outs = token_run(x[mine], labels[mine], 1)
    compare("token", full_loss, full_grads, loss, grads)
    results["token"].update(accuracy=float(outs[0]["accuracy"]), tokens=float(outs[0]["tokens"]), full_accuracy=full_acc)
    loss, grads, outs = token_run(x[mine], labels[mine], 2, num_tokens=int(keep.sum()))
    compare("token_accumulated", full_loss, full_grads, loss, grads)

    # all_gather_with_grad itself: uneven sizes, and backward sums every rank's gradient
    sizes = [3, 1]
    full = torch.arange(8.0).reshape(4, 2)
    mine = full[sum(sizes[:rank]) : sum(sizes[: rank + 1])].clone().requires_grad_()
    gathered = all_gather_with_grad(mine)
    coef = torch.full_like(full, rank + 1.0)  # rank r weighs every row by r + 1
    (gathered * coef).sum().backward()
    results["gather"] = {"equal": bool(torch.equal(gathered.detach(), full)),
                         "grad": mine.grad.unique().tolist()}

    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as fh:
        json.dump(results, fh)
    """
)

CASES = ["clip_global_7-7", "tiled_global_7-7", "clip_global_5-3", "tiled_global_5-3", "clip_local",
         "tiled_local", "siglip", "token", "token_accumulated"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_losses_on_two_processes_equal_the_full_batch(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"], r["process_index"]) for r in ranks] == [(0, 2, 0), (1, 2, 1)]
    for case in CASES:
        for r in ranks:
            assert r[case]["loss"] <= 1e-6 and r[case]["grad"] <= 1e-6, (case, r["rank"], r[case])
        assert ranks[0][case]["value"] > 0.1  # a real loss, not a vacuous 0 == 0
    token = [r["token"] for r in ranks]
    assert token[0]["tokens"] == token[1]["tokens"] == 20
    assert token[0]["accuracy"] == token[1]["accuracy"] == token[0]["full_accuracy"]
    # rows are gathered in rank order; each rank's gradient is 1 + 2, the sum over both ranks' weights
    assert all(r["gather"] == {"equal": True, "grad": [3.0]} for r in ranks)
