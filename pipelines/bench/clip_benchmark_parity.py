"""`mmpretrain eval` and CLIP_benchmark on the same CLIP_benchmark-format folders and the same model.

From a prepared split (--shards, e.g. shards/demo/val) it writes two folders the way
`clip_benchmark_export_wds` does (webdataset.ShardWriter, keys s%07d, test/{0..n-1}.tar +
test/nshards.txt):

* retrieval/: each image with two captions as two lines of its .txt, and the first --duplicates
  images a second time as their own samples with other captions (CLIP_benchmark counts each sample
  as its own image; so does our default, --positives sample);
* classification/: each image with its .cls, classnames.txt from the shards' dataset.json and a
  zeroshot_classification_templates.txt of three {c} templates.

Then it scores --export (an `mmpretrain export` folder, open_clip's local-dir: layout) with both:
ours `mmpretrain eval retrieval|zeroshot --checkpoint EXPORT --shards FOLDER` and CLIP_benchmark
`clip_benchmark eval --dataset wds/... --dataset_root FOLDER --model local-dir:EXPORT --no_amp`
(fp32 both; CLIP_benchmark runs in its own environment, --cb-python, because it pins numpy < 2.4),
and prints the numbers side by side.

    uv venv /tmp/cbvenv && uv pip install --python /tmp/cbvenv/bin/python torch torchvision \\
        open_clip_torch 'numpy<2.4' requests clip-benchmark
    .venv/bin/python pipelines/bench/clip_benchmark_parity.py --shards shards/demo/val \\
        --export runs/demo/export --cb-python /tmp/cbvenv/bin/python --classnames demo_run/raw/classes.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import webdataset as wds

from mmpretrain.shards.format import image_ext
from mmpretrain.shards.reader import iter_tar_samples
from mmpretrain.shards.resolve import ShardSource, dataset_root, resolve

TEMPLATES = ("a photo of a {c}.", "a picture showing a {c}.", "an image of the {c}.")


def samples(pattern: str) -> list[tuple[str, bytes, str, int | None]]:
    out = []
    for shard in resolve([ShardSource(pattern)], need_sizes=False):
        for sample in iter_tar_samples(shard.url):
            ext = image_ext(sample)
            label = int(sample["cls"]) if "cls" in sample else None
            out.append((ext, sample[ext], sample["txt"].decode().strip(), label))
    return out


def write_folder(root: Path, rows: list[dict], **files: str) -> None:
    (root / "test").mkdir(parents=True)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=100, verbose=0) as sink:
        for index, row in enumerate(rows):
            sink.write({"__key__": f"s{index:07d}", **row})
        count = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{count}\n")
    for name, text in files.items():
        (root / f"{name}.txt").write_text(text)


def ours(task: str, export: Path, folder: Path, work: Path) -> dict:
    out = work / f"ours-{task}.json"
    subprocess.run([sys.executable, "-m", "mmpretrain", "eval", task, "--checkpoint", str(export), "--shards",
                    str(folder), "--workers", "0", "--no-progress", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["metrics"]


def theirs(task: str, export: Path, folder: Path, work: Path, cb_python: str) -> dict:
    out = work / f"cb-{task}.json"
    cmd = [cb_python, "-m", "clip_benchmark.cli", "eval", "--dataset", f"wds/{folder.name}", "--dataset_root",
           str(folder), "--model", f"local-dir:{export}", "--pretrained", "", "--task", task, "--no_amp",
           "--batch_size", "64", "--num_workers", "0", "--recall_k", "1", "5", "10", "--output", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["metrics"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="a prepared split with captions and labels")
    p.add_argument("--export", type=Path, required=True, help="an `mmpretrain export` folder")
    p.add_argument("--cb-python", required=True, help="python of an environment with clip-benchmark")
    p.add_argument("--classnames", type=Path, help="class names, one per line (default: the shards' dataset.json)")
    p.add_argument("--duplicates", type=int, default=20, help="images that appear twice as separate samples")
    args = p.parse_args()
    data = samples(args.shards)
    classes = (args.classnames.read_text().split("\n") if args.classnames else
               json.loads((dataset_root(args.shards) / "dataset.json").read_text())["classes"])
    classes = [c.strip() for c in classes if c.strip()]
    if not classes:
        p.error("no class names: give --classnames FILE (the shards' dataset.json lists none)")
    work = Path(tempfile.mkdtemp(prefix="cb_parity_"))
    retrieval = [{ext: img, "txt": f"{cap}\nthere is {cap.lower().rstrip('.')} here"} for ext, img, cap, _ in data]
    retrieval += [{ext: img, "txt": f"the same picture again: {cap}"} for ext, img, cap, _ in data[:args.duplicates]]
    write_folder(work / "retrieval", retrieval, dataset_type="retrieval\n")
    write_folder(work / "classification", [{ext: img, "cls": label} for ext, img, _, label in data],
                 classnames="\n".join(classes) + "\n", zeroshot_classification_templates="\n".join(TEMPLATES) + "\n")
    print(f"{len(retrieval)} retrieval samples ({2 * len(data) + args.duplicates} captions, {args.duplicates} "
          f"pictures twice), {len(data)} classification samples, {len(classes)} classes; folders in {work}")
    pairs = []
    r_ours, r_cb = ours("retrieval", args.export, work / "retrieval", work), \
        theirs("zeroshot_retrieval", args.export, work / "retrieval", work, args.cb_python)
    for k in (1, 5, 10):
        pairs.append((f"text->image R@{k}", r_ours[f"text_to_image_R@{k}"], r_cb[f"image_retrieval_recall@{k}"]))
        pairs.append((f"image->text R@{k}", r_ours[f"image_to_text_R@{k}"], r_cb[f"text_retrieval_recall@{k}"]))
    z_ours, z_cb = ours("zeroshot", args.export, work / "classification", work), \
        theirs("zeroshot_classification", args.export, work / "classification", work, args.cb_python)
    pairs += [("zero-shot top-1", z_ours["acc1"], z_cb["acc1"]), ("zero-shot top-5", z_ours["acc5"], z_cb["acc5"]),
              ("mean per-class recall", z_ours["mean_per_class_recall"], z_cb["mean_per_class_recall"])]
    print(f"{'metric':<24}{'mmpretrain':>12}{'CLIP_benchmark':>16}{'difference':>12}")
    for name, a, b in pairs:
        print(f"{name:<24}{a:>12.4f}{b:>16.4f}{a - b:>12.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
