"""`mmpretrain eval` end to end on shards the test writes: embeddings and their order, metrics against
brute-force references on the same embeddings, every form of --checkpoint, 2 processes = 1 process,
reports, and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_checkpoint
from PIL import Image
from safetensors.torch import save_file

from mmpretrain.checkpoint.load import load_model
from mmpretrain.checkpoint.meta import checkpoint_meta
from mmpretrain.cli import main
from mmpretrain.data.plan import derive_seed
from mmpretrain.data.text.masking import IGNORE_INDEX, MaskingConfig
from mmpretrain.data.text.objectives import text_batch
from mmpretrain.data.transforms import image_transforms
from mmpretrain.eval.evaluator import EvalSettings, Evaluator
from mmpretrain.eval.retrieval import group_captions
from mmpretrain.eval.run import EvalRequest, run_eval
from mmpretrain.models import build_model
from mmpretrain.models.heads import Heads

CLASSES = ["alpha", "beta", "gamma", "delta"]
DUPLICATE_OF = {5: 2, 12: 2}  # sample -> sample whose image bytes it repeats (one image, two captions)
CAPTION_LISTS = {3: ["a first caption of three", "the second one", "and a third"],
                 8: ["eight has one", "eight has two", "eight has three"]}
DOCS = [f"document {i} says the quick brown fox jumps over {i} lazy dogs." for i in range(13)]
SIZES = (10, 7)  # samples per image shard: 17 samples, 15 distinct images, 21 captions


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for number, members in samples:
            for ext, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{number:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _image_samples(labels: bool) -> list[tuple[int, dict]]:
    samples = []
    for i in range(sum(SIZES)):
        image = _png(DUPLICATE_OF.get(i, i))
        meta = {"sha256": f"image-{DUPLICATE_OF.get(i, i)}"}
        if i in CAPTION_LISTS:
            meta["captions"] = CAPTION_LISTS[i]
        members = {"png": image, "txt": f"caption of sample {i}".encode(), "json": json.dumps(meta).encode()}
        if labels:
            members["cls"] = str(i % len(CLASSES)).encode()
        samples.append((i, members))
    return samples


def _write_image_set(root: Path, labels: bool, dataset_json: bool) -> str:
    samples = _image_samples(labels)
    _write_tar(root / "val" / "e-000000.tar", samples[:SIZES[0]])
    _write_tar(root / "val" / "e-000001.tar", samples[SIZES[0]:])
    (root / "val" / "sizes.json").write_text(json.dumps({"e-000000.tar": SIZES[0], "e-000001.tar": SIZES[1]}))
    if dataset_json:
        (root / "dataset.json").write_text(json.dumps({"name": root.name, "classes": CLASSES}))
    return str(root / "val" / "e-{000000..000001}.tar")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model, cfg, ckpt = tiny_checkpoint(root / "run", step=3)
    save_file({k: v.contiguous() for k, v in model.export_state_dict().items()}, root / "open_clip.safetensors")
    _write_tar(root / "text" / "val" / "t-000000.tar", [(i, {"txt": d.encode()}) for i, d in enumerate(DOCS)])
    _write_tar(root / "empty" / "x-000000.tar", [])
    _unreadable_checkpoints(root, ckpt)
    no_heads = root / "noheads" / "checkpoints" / ckpt.name
    no_heads.mkdir(parents=True)
    bare = build_model(cfg, heads=Heads(mlm=False, ar=False))
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, no_heads / "model.safetensors")
    (no_heads / "checkpoint.json").write_text(json.dumps(checkpoint_meta(3, cfg, Heads(mlm=False, ar=False))))
    return {
        "root": root, "model": model, "cfg": cfg, "run": str(root / "run"), "ckpt": str(ckpt),
        "weights": str(root / "open_clip.safetensors"),
        "images": _write_image_set(root / "img", labels=True, dataset_json=True),
        "unlabelled": _write_image_set(root / "nolab", labels=False, dataset_json=True),
        "no_names": _write_image_set(root / "nonames", labels=True, dataset_json=False),
        "text": str(root / "text" / "val"), "empty": str(root / "empty" / "x-000000.tar"),
    }


def _unreadable_checkpoints(root: Path, ckpt: Path) -> None:
    """Checkpoints a user may be handed that cannot be read: garbage, cut short, empty, a run whose
    weights file is damaged, a run whose checkpoint.json is not JSON."""
    weights = (ckpt / "model.safetensors").read_bytes()
    (root / "garbage.safetensors").write_bytes(b"\x00\xffnot a safetensors file" * 40)
    (root / "truncated.safetensors").write_bytes(weights[:len(weights) // 2])
    torch.save({"state_dict": {}}, root / "empty.pt")
    for name, part, damage in (("bad-weights", "model.safetensors", weights[:100]),
                               ("bad-meta", "checkpoint.json", b"{not json")):
        copy = root / name / "checkpoints" / ckpt.name
        copy.mkdir(parents=True)
        for f in ckpt.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        (copy / part).write_bytes(damage)


def _cli(*args: str) -> int:
    return main(["eval", *args, "--workers", "0", "--no-progress"])


def _evaluator(data, batch_size=4) -> Evaluator:
    return Evaluator(data["model"], data["cfg"], settings=EvalSettings(batch_size=batch_size, num_workers=0,
                                                                        progress=False))


# -- embeddings --------------------------------------------------------------------------------------
def test_embeddings_follow_shard_order_with_every_caption(data):
    emb = _evaluator(data).embed([data["images"]], texts=True)
    assert [index for _, index in emb.sources] == list(range(SIZES[0])) + list(range(SIZES[1]))
    assert [Path(url).name for url, _ in emb.sources] == ["e-000000.tar"] * SIZES[0] + ["e-000001.tar"] * SIZES[1]
    expected = [c for i in range(sum(SIZES)) for c in CAPTION_LISTS.get(i, [f"caption of sample {i}"])]
    assert emb.captions == expected
    assert emb.text_sample.tolist() == [i for i in range(sum(SIZES)) for _ in CAPTION_LISTS.get(i, [0])]
    assert emb.labels.tolist() == [i % 4 for i in range(sum(SIZES))]
    # the values are the model's own embeddings of each image / caption
    transform = image_transforms(64, train=False)
    images = torch.stack([transform(Image.open(io.BytesIO(_png(DUPLICATE_OF.get(i, i))))) for i in range(17)])
    tokens = _evaluator(data).tokenizer.encode(expected)
    with torch.no_grad():
        torch.testing.assert_close(emb.image, data["model"].encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(emb.text, data["model"].encode_text(tokens.ids, tokens.eot_index),
                                   atol=1e-5, rtol=1e-4)


# -- retrieval ---------------------------------------------------------------------------------------
def test_retrieval_equals_bruteforce_and_chunking_changes_nothing(data, capsys, retrieval_reference):
    """Default positives = CLIP_benchmark's: each of the 17 samples is its own image (two pairs of them
    hold the same picture); --positives image merges equal hashes into 15 images."""
    out, report = data["root"] / "retrieval.json", data["root"] / "retrieval.png"
    assert _cli("retrieval", "--checkpoint", data["run"], "--shards", data["images"], "--batch-size", "4",
                "--out", str(out), "--report", str(report)) == 0
    table = capsys.readouterr().out
    assert "text → image" in table and "17 images, 21 captions (17 samples)" in table
    result = json.loads(out.read_text())
    emb = _evaluator(data).embed([data["images"]], texts=True)  # same batches: the same bits
    reference = retrieval_reference.metrics(emb.image.double(), emb.text.double(), emb.text_sample)
    metrics = result["metrics"]
    assert {k: metrics[k] for k in reference} == pytest.approx(reference, abs=1e-12)
    assert (metrics["num_images"], metrics["num_texts"], metrics["num_samples"]) == (17, 21, 17)
    assert result["counts"] == {"samples": 17, "images": 17, "distinct_images": 15, "captions": 21, "skipped": {}}
    assert result["settings"]["positives"] == "sample"
    assert result["model"]["kind"] == "checkpoint" and result["model"]["step"] == 3
    assert result["settings"]["processes"] == 1
    with Image.open(report) as png:
        assert png.format == "PNG" and png.width > 600 and png.height > 8 * 128
    assert sorted(p.name for p in data["root"].iterdir() if p.name.startswith(".")) == []  # no temp files

    chunked = data["root"] / "chunked.json"
    assert _cli("retrieval", "--checkpoint", data["ckpt"], "--shards", data["images"], "--batch-size", "4",
                "--chunk-size", "2", "--out", str(chunked)) == 0
    assert json.loads(chunked.read_text())["metrics"] == metrics

    merged = data["root"] / "merged.json"
    assert _cli("retrieval", "--checkpoint", data["ckpt"], "--shards", data["images"], "--batch-size", "4",
                "--positives", "image", "--out", str(merged)) == 0
    groups = group_captions([emb.hashes[s] for s in emb.text_sample.tolist()])
    reference = retrieval_reference.metrics(emb.image[emb.text_sample[groups.image_rows]].double(),
                                            emb.text.double(), groups.text_to_image)
    result = json.loads(merged.read_text())
    assert {k: result["metrics"][k] for k in reference} == pytest.approx(reference, abs=1e-12)
    assert (result["metrics"]["num_images"], result["counts"]["images"]) == (15, 15)
    assert result["settings"]["positives"] == "image"


# -- zero-shot ---------------------------------------------------------------------------------------
def test_zeroshot_uses_dataset_json_names_and_matches_reference(data, capsys):
    out, report = data["root"] / "zeroshot.json", data["root"] / "zeroshot.png"
    assert _cli("zeroshot", "--checkpoint", data["run"], "--shards", data["images"], "--out", str(out),
                "--report", str(report)) == 0
    assert "top-1 %" in capsys.readouterr().out
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    evaluator = _evaluator(data, batch_size=256)
    emb = evaluator.embed([data["images"]], texts=False)
    from mmpretrain.eval import DEFAULT_TEMPLATES, class_embeddings

    classes = class_embeddings(evaluator.encode_texts, CLASSES, DEFAULT_TEMPLATES)
    predicted = (emb.image.double() @ classes.double().T).argmax(1)
    assert metrics["acc1"] == pytest.approx((predicted == emb.labels).double().mean().item())
    assert "acc5" not in metrics  # 4 classes: top-5 is meaningless
    assert [c["class"] for c in metrics["per_class"]] == CLASSES
    assert [c["count"] for c in metrics["per_class"]] == [5, 4, 4, 4]
    assert result["settings"]["classnames"] == str(data["root"] / "img" / "dataset.json")
    assert (result["settings"]["templates"], result["settings"]["num_templates"]) == ("default", 12)
    assert result["counts"]["labelled"] == 17
    with Image.open(report) as png:
        assert png.format == "PNG"


def test_zeroshot_templates_and_classnames_files(data, tmp_path):
    (tmp_path / "names.txt").write_text("one\ntwo\nthree\nfour\nfive\n")
    (tmp_path / "templates.txt").write_text("a picture of {}.\n\n{} again\n")
    out = tmp_path / "z.json"
    assert _cli("zeroshot", "--checkpoint", data["run"], "--shards", data["no_names"], "--classnames",
                str(tmp_path / "names.txt"), "--templates", str(tmp_path / "templates.txt"), "--out", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["num_templates"] == 2
    assert [c["class"] for c in result["metrics"]["per_class"]] == ["one", "two", "three", "four", "five"]
    assert "acc5" in result["metrics"] and result["metrics"]["per_class"][4]["recall"] is None  # no "five" images


# -- text --------------------------------------------------------------------------------------------
def test_text_metrics_equal_a_reference_with_per_text_masks(data):
    out = data["root"] / "text.json"
    assert _cli("text", "--checkpoint", data["run"], "--shards", data["text"], "--batch-size", "5",
                "--seed", "3", "--out", str(out)) == 0
    metrics = json.loads(out.read_text())["metrics"]
    model, tok = data["model"], _evaluator(data).tokenizer
    weight = model.tower.token_embedding.weight
    correct = tokens = 0
    nll = ar_tokens = 0.0
    with torch.no_grad():
        for i, doc in enumerate(DOCS):
            gen = torch.Generator().manual_seed(derive_seed(3, "mask", f"{i:09d}"))
            batch = text_batch([doc], tok, MaskingConfig(), gen)
            o = model.text_predictions(batch)
            logits = F.linear(o["mlm"].hidden, weight, model.mlm_head.bias)
            correct += int((logits.argmax(-1) == o["mlm"].labels).sum())
            tokens += len(o["mlm"].labels)
            keep = batch.ar_labels != IGNORE_INDEX
            assert torch.equal(o["ar"].labels, batch.ar_labels[keep])
            nll += F.cross_entropy(o["ar"].hidden @ weight.T, o["ar"].labels, reduction="sum").item()
            ar_tokens += int(keep.sum())
    assert (metrics["mlm_tokens"], metrics["ar_tokens"], metrics["num_texts"]) == (tokens, ar_tokens, len(DOCS))
    assert metrics["ar_tokens"] == int((tok.encode(DOCS).lengths - 1).sum())
    assert metrics["mlm_accuracy"] == correct / tokens
    assert metrics["ar_nll"] == pytest.approx(nll / ar_tokens, rel=1e-6)
    assert metrics["ar_perplexity"] == pytest.approx(np.exp(nll / ar_tokens), rel=1e-5)


# -- checkpoint forms --------------------------------------------------------------------------------
def test_every_checkpoint_form_loads_the_same_model(data, tmp_path, capsys):
    import open_clip

    export = tmp_path / "export"
    assert main(["export", "--checkpoint", data["run"], "--out", str(export)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = _evaluator(data).tokenizer.encode(["a red circle", "two blue squares on grass", "x"])
    forms = {"run": load_model(data["run"]), "checkpoint": load_model(data["ckpt"]), "export": load_model(export),
             "open_clip": load_model(data["weights"], "tiny")}
    assert {k: v.kind for k, v in forms.items()} == {"run": "checkpoint", "checkpoint": "checkpoint",
                                                     "export": "export", "open_clip": "open_clip"}
    assert forms["export"].heads == Heads(mlm=True, ar=True) and forms["open_clip"].heads == Heads()
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    reference.eval()
    with torch.no_grad():
        want_img = data["model"].encode_image(images)
        want_txt = data["model"].encode_text(tokens.ids, tokens.eot_index)
        for name, loaded in forms.items():
            torch.testing.assert_close(loaded.model.encode_image(images), want_img, msg=name)
            torch.testing.assert_close(loaded.model.encode_text(tokens.ids, tokens.eot_index), want_txt, msg=name)
        torch.testing.assert_close(reference.encode_image(images, normalize=True), want_img)
        torch.testing.assert_close(reference.encode_text(tokens.ids, normalize=True), want_txt)
        mlm = forms["export"].model.mlm_head.state_dict()
        for key, value in data["model"].mlm_head.state_dict().items():
            assert torch.equal(mlm[key], value)
    # an existing export is not overwritten by accident
    assert main(["export", "--checkpoint", data["run"], "--out", str(export)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_open_clip_weights_file_evaluates_with_its_model_name(data, tmp_path):
    out = tmp_path / "r.json"
    assert _cli("retrieval", "--checkpoint", data["weights"], "--model", "tiny", "--shards", data["images"],
                "--batch-size", "4", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["model"]["kind"] == "open_clip" and result["model"]["heads"]["mlm"] is False
    reference = json.loads((data["root"] / "retrieval.json").read_text()) if (
        data["root"] / "retrieval.json").exists() else None
    if reference is not None:  # the same weights give the same numbers as the checkpoint they came from
        assert result["metrics"] == reference["metrics"]


# -- bad input ---------------------------------------------------------------------------------------
BAD = {
    "no labels": (["zeroshot", "--checkpoint", "{run}", "--shards", "{unlabelled}"], "has a label (KEY.cls)"),
    "no class names": (["zeroshot", "--checkpoint", "{run}", "--shards", "{no_names}"], "--classnames FILE"),
    "empty shard": (["retrieval", "--checkpoint", "{run}", "--shards", "{empty}"], "holds no samples"),
    "no shards": (["retrieval", "--checkpoint", "{run}", "--shards", "{root}/nothing-*.tar"], "matches no files"),
    "missing checkpoint": (["retrieval", "--checkpoint", "{root}/nope", "--shards", "{images}"],
                           "no such file or directory"),
    "unknown directory": (["retrieval", "--checkpoint", "{root}/text", "--shards", "{images}"], "neither a run"),
    "weights without model": (["retrieval", "--checkpoint", "{weights}", "--shards", "{images}"], "--model NAME"),
    "text without heads": (["text", "--checkpoint", "{weights}", "--model", "tiny", "--shards", "{text}"],
                           "no text heads"),
    "missing shard file": (["retrieval", "--checkpoint", "{run}", "--shards", "{root}/img/e-000009.tar"],
                           "e-000009.tar"),
    "garbage weights": (["retrieval", "--checkpoint", "{root}/garbage.safetensors", "--model", "tiny",
                         "--shards", "{images}"], "garbage.safetensors"),
    "truncated weights": (["retrieval", "--checkpoint", "{root}/truncated.safetensors", "--model", "tiny",
                           "--shards", "{images}"], "truncated.safetensors"),
    "empty .pt state dict": (["retrieval", "--checkpoint", "{root}/empty.pt", "--model", "tiny",
                              "--shards", "{images}"], "empty.pt: holds no weights"),
    "run with damaged weights": (["retrieval", "--checkpoint", "{root}/bad-weights", "--shards", "{images}"],
                                 "model.safetensors"),
    "run with damaged checkpoint.json": (["retrieval", "--checkpoint", "{root}/bad-meta", "--shards", "{images}"],
                                         "checkpoint.json"),
    "zeroshot on text shards": (["zeroshot", "--checkpoint", "{run}", "--shards", "{text}"], "{text}"),
    "text on a run without heads": (["text", "--checkpoint", "{root}/noheads", "--shards", "{text}"],
                                    "trained with model.mlm=false and model.ar=false"),
    "report not png": (["retrieval", "--checkpoint", "{run}", "--shards", "{images}", "--report", "{root}/r.jpg"],
                       "ending in .png"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(data, capsys, case):
    args, expected = BAD[case]
    assert _cli(*(a.format(**data) for a in args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpretrain eval: error:") and "\n" not in err and expected.format(**data) in err, err


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_runs_code_is_refused_without_running_it(data, capsys, protocol):
    marker, evil = data["root"] / "ran", data["root"] / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"visual.proj": _RunsCode(marker)}, fh, protocol=protocol)
    assert _cli("retrieval", "--checkpoint", str(evil), "--model", "tiny", "--shards", data["images"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmpretrain eval: error:") and "\n" not in err, err
    assert "evil.pt: cannot read safely (Unsupported" in err and "runs no code" in err
    assert not marker.exists()


# -- two processes -----------------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from accelerate import Accelerator
    from mmpretrain.eval.evaluator import EvalSettings
    from mmpretrain.eval.run import EvalRequest, run_eval

    out, run, images, text = sys.argv[1:5]
    acc = Accelerator(cpu=True)
    settings = EvalSettings(batch_size=1, num_workers=1, progress=False)
    results = {}
    for task, shards in (("retrieval", images), ("zeroshot", images), ("text", text)):
        results[task] = run_eval(EvalRequest(task=task, checkpoint=run, shards=[shards], settings=settings))
    if acc.is_main_process:
        with open(out, "w") as fh:
            json.dump(results, fh)
    else:
        assert all(r is None for r in results.values())
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(data, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(tmp_path / "two.json"), data["run"],
           data["images"], data["text"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    settings = EvalSettings(batch_size=1, num_workers=0, progress=False)
    for task, shards in (("retrieval", data["images"]), ("zeroshot", data["images"]), ("text", data["text"])):
        one = run_eval(EvalRequest(task=task, checkpoint=data["run"], shards=[shards], settings=settings))
        assert two[task]["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
        assert two[task]["counts"] == one["counts"], task
        if task == "text":  # sums of float NLLs in another order
            assert two[task]["metrics"] == pytest.approx(one["metrics"], rel=1e-9)
        else:
            assert two[task]["metrics"] == one["metrics"], task
