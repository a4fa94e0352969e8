"""CLIP_benchmark's own dataset folders, scored by `mmpretrain eval` exactly as CLIP_benchmark scores
them: several captions as the lines of one .txt, nshards.txt / classnames.txt / templates files with
{c}, duplicate images counted per sample; positives grouped by caption on request; the built-in
ImageNet-1k class names and OpenAI prompt sets."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import tiny_checkpoint
from open_clip import zero_shot_metadata
from PIL import Image

from mmpretrain.cli import main
from mmpretrain.errors import UserError
from mmpretrain.eval.evaluator import EvalSettings, Evaluator
from mmpretrain.eval.retrieval import caption_pairs, retrieval_metrics, retrieval_positives
from mmpretrain.eval.templates import builtin_classnames, builtin_templates, fill
from mmpretrain.eval.zeroshot import class_embeddings, zeroshot_prompts
from mmpretrain.models.heads import Heads

# sample -> its captions (the lines of its .txt); samples 4 and 9 repeat sample 1's picture, and
# 6 shares the caption "A frog." with 2
CAPTIONS = {i: [f"picture {i} from above", f"picture {i} from the side"] for i in range(11)}
CAPTIONS[2] = ["A frog.", "a green frog on a stone"]
CAPTIONS[6] = ["A frog."]
CAPTIONS[7] = [f"only one line for {7}"]
SAME_PICTURE = {4: 1, 9: 1}


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _benchmark_folder(root, samples: list[dict], **files: str) -> str:
    """A folder as clip_benchmark_export_wds writes it: webdataset.ShardWriter with keys s%07d,
    test/{0..n-1}.tar, test/nshards.txt, and the dataset's text files beside test/."""
    (root / "test").mkdir(parents=True)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=4, verbose=0) as sink:
        for index, sample in enumerate(samples):
            sink.write({"__key__": f"s{index:07d}", **sample})
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    for name, text in files.items():
        (root / f"{name}.txt").write_text(text)
    return str(root)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    model, cfg, _ = tiny_checkpoint(root / "run", step=1)
    return {"root": root, "model": model, "cfg": cfg, "run": str(root / "run")}


@pytest.fixture(scope="module")
def retrieval_set(model_dir):
    samples = [{"jpg": _jpeg(SAME_PICTURE.get(i, i)), "txt": "\n".join(CAPTIONS[i])} for i in range(11)]
    return _benchmark_folder(model_dir["root"] / "flickr-like", samples, dataset_type="retrieval\n")


def _evaluator(model_dir) -> Evaluator:
    return Evaluator(model_dir["model"], model_dir["cfg"],
                     settings=EvalSettings(batch_size=4, num_workers=0, progress=False))


def _eval(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    assert main(["eval", *args, "--workers", "0", "--no-progress", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_retrieval_folder_scores_what_clip_benchmark_scores(model_dir, retrieval_set, tmp_path,
                                                            retrieval_reference):
    result = _eval(tmp_path, "retrieval", "--checkpoint", model_dir["run"], "--shards", retrieval_set)
    emb = _evaluator(model_dir).embed([retrieval_set], texts=True)
    # every line of a .txt is a caption; the shards are the three nshards.txt names, in order
    assert emb.captions == [c for i in range(11) for c in CAPTIONS[i]]
    assert [s[0].rsplit("/", 1)[-1] for s in emb.sources] == ["0.tar"] * 4 + ["1.tar"] * 4 + ["2.tar"] * 3
    # CLIP_benchmark's positives: caption t belongs to its own sample, duplicates of a picture are
    # separate images (11 images, not 9)
    positive = torch.zeros(len(emb.captions), 11, dtype=torch.bool)
    positive[torch.arange(len(emb.captions)), emb.text_sample] = True
    metrics = result["metrics"]
    assert (metrics["num_images"], metrics["num_texts"]) == (11, len(emb.captions))
    for k in (1, 5, 10):
        t2i, i2t = retrieval_reference.benchmark_recall(emb.image.double(), emb.text.double(), positive, k)
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(t2i, abs=1e-12)
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-12)
    assert result["counts"]["distinct_images"] == 9 and result["settings"]["positives"] == "sample"


def test_positives_by_caption_text_and_by_image(model_dir, retrieval_set, tmp_path, retrieval_reference):
    emb = _evaluator(model_dir).embed([retrieval_set], texts=True)
    by_caption = _eval(tmp_path, "retrieval", "--checkpoint", model_dir["run"], "--shards", retrieval_set,
                       "--positives", "caption")["metrics"]
    frog = [t for t, c in enumerate(emb.captions) if c == "A frog."]
    assert len(frog) == 2
    positive = torch.zeros(len(emb.captions), 11, dtype=torch.bool)
    positive[torch.arange(len(emb.captions)), emb.text_sample] = True
    positive[frog[0], 6] = positive[frog[1], 2] = True  # "A frog." hits both frog pictures
    for k in (1, 5, 10):
        t2i, i2t = retrieval_reference.benchmark_recall(emb.image.double(), emb.text.double(), positive, k)
        assert by_caption[f"text_to_image_R@{k}"] == pytest.approx(t2i, abs=1e-12)
        assert by_caption[f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-12)

    by_image = _eval(tmp_path, "retrieval", "--checkpoint", model_dir["run"], "--shards", retrieval_set,
                     "--positives", "image")["metrics"]
    pos = retrieval_positives("image", emb.text_sample, emb.hashes, emb.captions)
    assert by_image["num_images"] == 9 and pos.image_rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10]
    reference = retrieval_reference.metrics(emb.image[pos.image_rows].double(), emb.text.double(),
                                            pos.text_to_image)
    assert {k: by_image[k] for k in reference} == pytest.approx(reference, abs=1e-12)


def test_caption_pairs_against_a_hand_made_list():
    captions = ["a", "b", "a", "c", "a", "b"]
    text_to_image = [0, 0, 1, 2, 1, 3]
    pair_text, pair_image = caption_pairs(captions, text_to_image)
    assert sorted(zip(pair_text.tolist(), pair_image.tolist())) == sorted(
        [(0, 0), (0, 1), (1, 0), (1, 3), (2, 0), (2, 1), (3, 2), (4, 0), (4, 1), (5, 0), (5, 3)])
    # with no shared text the pairs are the plain positives, and the metrics are equal
    gen = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(8, 8, dtype=torch.float64, generator=gen), dim=1)
    unique = [f"t{i}" for i in range(5)]
    t2i = torch.tensor([0, 0, 1, 2, 2])
    plain = retrieval_metrics(emb[:3], emb[3:8], t2i)
    assert retrieval_metrics(emb[:3], emb[3:8], t2i, pairs=caption_pairs(unique, t2i)) == plain


def test_classification_folder_with_benchmark_classnames_and_c_templates(model_dir, tmp_path):
    names = ["tench", "goldfish", "great white shark"]
    samples = [{"webp": _webp(i), "cls": i % 3} for i in range(7)]
    folder = _benchmark_folder(tmp_path / "cls-set", samples, classnames="\n".join(names) + "\n",
                               zeroshot_classification_templates="a photo of a {c}.\nart of the {c}.\n")
    result = _eval(tmp_path, "zeroshot", "--checkpoint", model_dir["run"], "--shards", folder)
    assert result["settings"]["classnames"] == str(tmp_path / "cls-set" / "classnames.txt")
    assert result["settings"]["templates"] == str(tmp_path / "cls-set" / "zeroshot_classification_templates.txt")
    evaluator = _evaluator(model_dir)
    emb = evaluator.embed([folder], texts=False)
    prompts = [[f"a photo of a {n}.", f"art of the {n}."] for n in names]  # as CLIP_benchmark fills {c}
    classes = torch.nn.functional.normalize(torch.stack(
        [torch.nn.functional.normalize(evaluator.encode_texts(p), dim=-1).mean(0) for p in prompts]), dim=-1)
    predicted = (emb.image.double() @ classes.double().T).argmax(1)
    assert emb.labels.tolist() == [i % 3 for i in range(7)]
    assert result["metrics"]["acc1"] == pytest.approx((predicted == emb.labels).double().mean().item())
    assert [c["class"] for c in result["metrics"]["per_class"]] == names


def _webp(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(seed))).save(buf, "WEBP")
    return buf.getvalue()


def test_builtin_imagenet_names_and_openai_prompts():
    assert builtin_classnames("imagenet1k") == list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    assert len(builtin_classnames("imagenet1k")) == 1000
    openai = builtin_templates("openai")
    assert len(openai) == 80 and len(set(openai)) == 80
    assert [fill(t, "axolotl") for t in openai] == [t("axolotl") for t in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert [fill(t, "axolotl") for t in builtin_templates("openai-7")] == [
        t("axolotl") for t in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES]
    assert len(builtin_templates("default")) == 12
    assert fill("a {c} and {} and {{}}", "cat") == "a cat and cat and {cat}"


def test_imagenet_layout_folder_scored_with_one_command(model_dir, tmp_path):
    """An ImageNet-layout folder (1000 synset folders) prepared with the class-folder source, scored
    with --classnames imagenet1k --templates openai-7: labels are synset order = the built-in order."""
    root = tmp_path / "imagenet-val"
    kept = {0: 2, 1: 1, 500: 1, 999: 2}  # class index -> images in its folder; the others are empty
    for c in range(1000):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for j in range(kept.get(c, 0)):
            (folder / f"img{j}.jpg").write_bytes(_jpeg(c * 10 + j))
    assert main(["prepare", str(root), "--out", str(tmp_path / "inet"), "--image-size", "32", "--workers", "1",
                 "--val-fraction", "0", "--no-progress"]) == 0
    shards = str(tmp_path / "inet" / "train")
    result = _eval(tmp_path, "zeroshot", "--checkpoint", model_dir["run"], "--shards", shards,
                   "--classnames", "imagenet1k", "--templates", "openai-7")
    assert (result["settings"]["classnames"], result["settings"]["templates"]) == ("imagenet1k", "openai-7")
    evaluator = _evaluator(model_dir)
    emb = evaluator.embed([shards], texts=False)
    assert sorted(emb.labels.tolist()) == [0, 0, 1, 500, 999, 999]
    names = list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    classes = class_embeddings(evaluator.encode_texts, names, [t("{}") for t in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES])
    predicted = (emb.image.double() @ classes.double().T).argmax(1)
    assert result["metrics"]["acc1"] == pytest.approx((predicted == emb.labels).double().mean().item())
    assert result["metrics"]["num_classes"] == 1000


def test_class_names_that_cannot_line_up_are_one_line(model_dir, tmp_path, capsys):
    samples = [{"jpg": _jpeg(i), "cls": i % 3} for i in range(4)]
    folder = _benchmark_folder(tmp_path / "three", samples, classnames="a\nb\nc\n")
    assert main(["eval", "zeroshot", "--checkpoint", model_dir["run"], "--shards", folder, "--classnames",
                 "imagenet1k", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 classes" in err and "1000" in err
    assert main(["eval", "zeroshot", "--checkpoint", model_dir["run"], "--shards", folder, "--templates",
                 "openai-80", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a built-in set (default, openai, openai-7)" in err and len(err.splitlines()) == 1
    (tmp_path / "three" / "test" / "nshards.txt").write_text("two\n")
    assert main(["eval", "zeroshot", "--checkpoint", model_dir["run"], "--shards", folder,
                 "--workers", "0", "--no-progress"]) == 2
    assert "nshards.txt holds 'two'" in capsys.readouterr().err


def test_zeroshot_prompts_resolution(tmp_path):
    folder = tmp_path / "f"
    (folder / "test").mkdir(parents=True)
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "classnames.txt").write_text("x\ny\n")
    prompts = zeroshot_prompts(None, None, [str(folder)])
    assert prompts.classnames == ["x", "y"] and prompts.templates_from == "default"
    (tmp_path / "openai").write_text("my {} prompt\n")  # a file of a set's name wins over the set
    assert zeroshot_prompts(None, str(tmp_path / "openai"), [str(folder)]).templates == ["my {} prompt"]


def test_training_eval_section_takes_the_same_choices(model_dir, retrieval_set, tmp_path):
    """eval.retrieval_positives / eval.templates (built-in names) / CLIP_benchmark folders during training."""
    from mmpretrain.config import EvalConfig, load_config
    from mmpretrain.eval.periodic import PeriodicEval

    samples = [{"jpg": _jpeg(i), "cls": i % 2} for i in range(5)]
    cls_set = _benchmark_folder(tmp_path / "two", samples, classnames="cat\ndog\n")
    cfg = EvalConfig(every=1, retrieval_shards=[retrieval_set], retrieval_positives="image",
                     zeroshot_shards=[cls_set], templates="openai-7", batch_size=4)
    periodic = PeriodicEval(cfg, heads=Heads(mlm=False, ar=False), model_config=model_dir["cfg"], num_workers=0,
                            seed=0)
    assert periodic.zeroshot.classnames == ["cat", "dog"] and len(periodic.zeroshot.templates) == 7
    scalars = periodic.run(model_dir["model"], torch.device("cpu"), contextlib.nullcontext)
    assert scalars["retrieval/num_images"] == 9 and scalars["zeroshot/num_classes"] == 2
    with pytest.raises(UserError, match="eval.retrieval_positives"):
        load_config(None, ["eval.retrieval_positives=hash"])
