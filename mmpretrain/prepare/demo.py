"""Procedural demo data: seeded image-caption scenes drawn with Pillow, plus a text-only corpus.

The CPU demo trains a tiny CLIP on these files, so every scene is built only from attributes that a
caption names and a 64 px image shows: shape, colour, size, position (3x3 grid), count and
background (task "rich"), or shape, colour and position with the rest fixed (task "binding").
Nothing is downloaded. The same seed gives byte-identical files: every random choice comes from a
`random.Random` seeded by (seed, image index), PNG is lossless and Pillow writes no timestamp into
it, and drawing uses no anti-aliasing, so each named RGB value lands in the pixels exactly (the
tests rely on that).
"""

from __future__ import annotations

import csv
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmpretrain.errors import UserError

# Label = index in this list; written to classes.txt in this order. Never reorder. No hexagon or
# pentagon: at a 4-9 px radius they rasterise to nearly the same pixels as the circle (IoU 0.9-0.93
# measured); with a ring instead, no two classes overlap by more than IoU 0.83 at 3.5-9 px (tested).
CLASSES = ["circle", "square", "triangle", "star", "ring", "diamond", "cross", "heart"]
PLURALS = {"cross": "crosses"}  # every other class takes a plain "s"
# Saturated colours; none equals a (pastel) background colour, so a colour check on pixels is exact.
COLORS = {
    "red": (220, 30, 30), "orange": (245, 130, 20), "yellow": (235, 200, 0), "green": (30, 160, 50),
    "teal": (0, 128, 128), "blue": (30, 70, 220), "purple": (130, 40, 170), "pink": (240, 100, 180),
    "brown": (120, 70, 25), "black": (20, 20, 20),
}
SIZES = {"small": 0.08, "medium": 0.105, "large": 0.14}  # shape radius as a fraction of image_size
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "medium-sized"), "large": ("large", "big")}
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two",), 3: ("three",)}
# Groups of 2-3 shapes shrink so that they still fit around their grid cell.
COUNT_SCALE = {1: 1.0, 2: 0.8, 3: 0.68}
# Centre offsets of each instance in units of the radius: 2.7 r apart, and no outline reaches past
# 1.2 r, so instances of a group stay apart (2.3 r, tried first, merged hearts into one blob at 64 px).
OFFSETS = {1: [(0.0, 0.0)], 2: [(-1.35, 0.0), (1.35, 0.0)], 3: [(-1.35, 0.78), (1.35, 0.78), (0.0, -1.56)]}
POSITIONS = {  # name -> (column, row, caption phrases)
    "top left": (0, 0, ("in the top left", "in the top left corner", "at the top left")),
    "top": (1, 0, ("at the top", "at the top center", "near the top edge")),
    "top right": (2, 0, ("in the top right", "in the top right corner", "at the top right")),
    "left": (0, 1, ("on the left", "on the left side", "at the left edge")),
    "center": (1, 1, ("in the center", "in the middle", "at the center")),
    "right": (2, 1, ("on the right", "on the right side", "at the right edge")),
    "bottom left": (0, 2, ("in the bottom left", "in the bottom left corner", "at the bottom left")),
    "bottom": (1, 2, ("at the bottom", "at the bottom center", "near the bottom edge")),
    "bottom right": (2, 2, ("in the bottom right", "in the bottom right corner", "at the bottom right")),
}
BACKGROUNDS = {  # caption name -> (pattern, pastel colour, sentence for the corpus)
    "white": ("plain", (255, 255, 255), "plain white"),
    "gray": ("plain", (200, 200, 200), "a flat light gray"),
    "beige": ("plain", (238, 226, 198), "a warm beige"),
    "striped blue": ("stripes", (176, 204, 240), "striped with light blue and white bands"),
    "checkered": ("checker", (212, 212, 212), "a gray and white checkerboard"),
    "green gradient": ("gradient", (190, 232, 190), "a gradient from pale green to white"),
}
TEMPLATES = (
    "{np} {pos} on a {bg} background.",
    "a photo of {np} {pos}, {bg} background.",
    "an image of {np} {pos} on a {bg} background.",
    "a {bg} background with {np} {pos}.",
    "there {be} {np} {pos} on a {bg} background.",
    "{np} {pos} against a {bg} background.",
    "a drawing of {np} placed {pos} on a {bg} background.",
    "{pos}, {np} on a {bg} background.",
)
SHAPE_FACTS = {
    "circle": "A circle has no corners at all.", "square": "A square has four equal sides.",
    "triangle": "A triangle has three sides and points upward here.", "star": "A star has five points.",
    "ring": "A ring is a circle with a hole in the middle.",
    "diamond": "A diamond is a tall shape with four corners.",
    "cross": "A cross is made of two bars that meet in the middle.",
    "heart": "A heart has two round lobes on top and a point at the bottom.",
}
COLOR_KINDS = {"red": "warm", "orange": "warm", "yellow": "warm", "pink": "warm", "green": "cool",
               "teal": "cool", "blue": "cool", "purple": "cool", "brown": "dark", "black": "dark"}
_FILES_PER_DIR = 1000  # images per folder/ subdirectory (img2dataset's key // N layout)


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else PLURALS.get(shape, shape + "s")


@dataclass(frozen=True)
class Task:
    """Which values of each attribute a collection's scenes draw from (shape, colour and position always
    take all of theirs)."""

    sizes: tuple[str, ...]
    max_count: int
    backgrounds: tuple[str, ...]

    @property
    def scenes(self) -> int:
        return len(CLASSES) * len(COLORS) * len(POSITIONS) * len(self.sizes) * self.max_count * len(self.backgrounds)


TASKS = {
    # All six attributes vary: 38,880 scenes; a caption can be told from an in-batch one by any of them.
    "rich": Task(sizes=tuple(SIZES), max_count=3, backgrounds=tuple(BACKGROUNDS)),
    # One large object on white: shape x colour x position, 720 scenes. In a batch of 64 a caption has
    # on average 0.7 others that differ from it in the shape alone, so the shape has to be bound to the
    # colour and the cell (the quickstart's task: zero-shot asks for the shape).
    "binding": Task(sizes=("large",), max_count=1, backgrounds=("white",)),
}


def _sample_scene(rng: random.Random, task: Task) -> dict:
    return {"shape": rng.choice(CLASSES), "color": rng.choice(list(COLORS)), "size": rng.choice(task.sizes),
            "position": rng.choice(list(POSITIONS)), "count": rng.randint(1, task.max_count),
            "background": rng.choice(task.backgrounds)}


def _noun_phrase(scene: dict, rng: random.Random) -> str:
    words = (rng.choice(COUNT_WORDS[scene["count"]]), rng.choice(SIZE_WORDS[scene["size"]]),
             scene["color"], plural(scene["shape"], scene["count"]))
    return " ".join(words)


def _caption(scene: dict, rng: random.Random) -> str:
    text = rng.choice(TEMPLATES).format(
        np=_noun_phrase(scene, rng), pos=rng.choice(POSITIONS[scene["position"]][2]),
        bg=scene["background"], be="is" if scene["count"] == 1 else "are")
    return text[0].upper() + text[1:]


def _background(name: str, size: int) -> Image.Image:
    pattern, rgb, _ = BACKGROUNDS[name]
    img = Image.new("RGB", (size, size), rgb if pattern == "plain" else (255, 255, 255))
    draw, band = ImageDraw.Draw(img), max(2, size // 8)
    for y in range(size):
        if pattern == "gradient":
            t = y / (size - 1)
            draw.line([(0, y), (size - 1, y)], fill=tuple(round(c + (255 - c) * t) for c in rgb))
        elif pattern == "stripes" and (y // band) % 2 == 0:
            draw.line([(0, y), (size - 1, y)], fill=rgb)
        elif pattern == "checker":
            for x in range(0, size, band):
                if (x // band + y // band) % 2:
                    draw.line([(x, y), (x + band - 1, y)], fill=rgb)
    return img


def _regular(cx: float, cy: float, radius: float, n: int, phase: float) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon around (cx, cy); phase turns the first vertex (0 = pointing right)."""
    angles = [phase + 2 * math.pi * k / n for k in range(n)]
    return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of one shape with radius r. Proportions are chosen so that the eight classes keep
    distinct silhouettes at a 3.5 px radius (a diamond is narrower than a turned square, a star's
    inner radius is large enough that its points do not vanish)."""
    if shape == "square":
        return _regular(cx, cy, 1.15 * r, 4, math.pi / 4)
    if shape == "triangle":
        return _regular(cx, cy + 0.2 * r, 1.2 * r, 3, -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - 1.2 * r), (cx + 0.7 * r, cy), (cx, cy + 1.2 * r), (cx - 0.7 * r, cy)]
    if shape == "star":
        outer = _regular(cx, cy, 1.2 * r, 5, -math.pi / 2)
        inner = _regular(cx, cy, 0.5 * r, 5, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, t = 1.2 * r, 0.3 * r  # thin arms: a thicker cross looks like a circle at 3-4 px
        pts = [(t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a),
               (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t), (-t, -a)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "heart":  # the classic parametric heart curve, scaled from its +-16 unit box to r
        ts = [2 * math.pi * k / 24 for k in range(24)]
        xs = [16 * math.sin(t) ** 3 for t in ts]
        ys = [13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t) for t in ts]
        return [(cx + r / 15 * x, cy - r / 15 * y - 0.1 * r) for x, y in zip(xs, ys)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":  # the hole shows the background, whatever its pattern
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.4 * r)))
    else:
        draw.polygon(_outline(shape, cx, cy, r), fill=fill)


def _draw_scene(scene: dict, size: int, backgrounds: dict, rng: random.Random) -> Image.Image:
    img = backgrounds[scene["background"]].copy()
    count, (col, row, _) = scene["count"], POSITIONS[scene["position"]]
    r = SIZES[scene["size"]] * COUNT_SCALE[count] * size
    flip = rng.choice((1.0, -1.0))  # a group of three points up or down
    cx = (col + 0.5) * size / 3 + rng.uniform(-0.04, 0.04) * size
    cy = (row + 0.5) * size / 3 + rng.uniform(-0.04, 0.04) * size
    xs = [cx + dx * r for dx, _ in OFFSETS[count]]
    ys = [cy + flip * dy * r for _, dy in OFFSETS[count]]
    # Shift the whole group back inside the frame; it stays anchored on its named cell.
    reach = 1.25 * r
    sx = max(0.0, reach - min(xs)) - max(0.0, max(xs) + reach - (size - 1))
    sy = max(0.0, reach - min(ys)) - max(0.0, max(ys) + reach - (size - 1))
    draw = ImageDraw.Draw(img)
    for x, y in zip(xs, ys):
        _draw_shape(draw, scene["shape"], x + sx, y + sy, r, COLORS[scene["color"]])
    return img


def _scene_sentences(scene: dict, rng: random.Random) -> list[str]:
    """One scene told in 2-5 sentences: the scene itself first, then details in random order."""
    n, noun, color = scene["count"], scene["shape"], scene["color"]
    np_ = _noun_phrase(scene, rng)
    pos = rng.choice(POSITIONS[scene["position"]][2])
    opener = rng.choice(("The picture shows {np} {pos}.", "Here we see {np} {pos}.",
                         "{np} {sit} {pos}.", "Someone drew {np} {pos}."))
    text = opener.format(np=np_, pos=pos, sit="sits" if n == 1 else "sit")
    every = ("The", "Both", "All three")[n - 1]
    details = [f"The background is {BACKGROUNDS[scene['background']][2]}.", SHAPE_FACTS[noun],
               f"{every} {plural(noun, n)} {'is' if n == 1 else 'are'} {color}.",
               f"{'It is' if n == 1 else 'They are'} {scene['size']} compared with the whole frame.",
               f"{color.capitalize()} is a {COLOR_KINDS[color]} color.",
               "Nothing else is drawn in the picture."]
    rng.shuffle(details)
    return [text[0].upper() + text[1:]] + details[: rng.randint(1, 4)]


def _document(rng: random.Random, task: Task) -> str:
    """A paragraph of 3-12 sentences about one to several scenes."""
    target, sentences = rng.randint(3, 12), []
    while len(sentences) < target:
        scene_text = _scene_sentences(_sample_scene(rng, task), rng)
        if sentences:
            scene_text[0] = rng.choice(("In another picture, ", "Next, ", "Elsewhere, ")) + \
                scene_text[0][0].lower() + scene_text[0][1:]
        sentences += scene_text
    return " ".join(sentences[:target])


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary name and os.replace, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_args(out: Path, num_images: int, image_size: int, num_documents: int, fraction: float,
                task: str) -> None:
    if task not in TASKS:
        raise UserError(f"demo-data: --task {task!r} is not one of {', '.join(TASKS)}")
    if num_images < 1 or num_documents < 0:
        raise UserError(f"demo-data: need --num-images >= 1 and --num-documents >= 0, "
                        f"got {num_images} and {num_documents}")
    if not 16 <= image_size <= 1024:
        raise UserError(f"demo-data: --image-size must be in [16, 1024], got {image_size}")
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"demo-data: manifest_fraction must be in [0, 1], got {fraction}")
    if out.exists() and not out.is_dir():
        raise UserError(f"demo-data: --out {out} exists and is not a directory; pick another path")
    ours = {"folder", "manifest_images", "manifest.csv", "corpus.txt", "classes.txt"}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(".tmp")) \
        if out.exists() else []
    if foreign:  # we delete and rebuild our own outputs, so refuse a folder that holds anything else
        raise UserError(f"demo-data: --out {out} already holds other files ({', '.join(foreign[:3])}); "
                        "use an empty or new directory")


def _write_images(out: Path, num_images: int, num_folder: int, size: int, seed: int,
                  task: Task) -> tuple[list, set]:
    """Draw and save every image; return the manifest rows and the set of captions."""
    backgrounds = {name: _background(name, size) for name in BACKGROUNDS}  # drawn once, copied per image
    rows, captions = [], set()
    for i in range(num_images):
        rng = random.Random(f"demo-image:{seed}:{i}")  # per image: image i never depends on num_images
        scene = _sample_scene(rng, task)
        caption, key = _caption(scene, rng), f"{i:09d}"
        img, label = _draw_scene(scene, size, backgrounds, rng), CLASSES.index(scene["shape"])
        captions.add(caption)
        if i < num_folder:
            sub = out / "folder" / f"{i // _FILES_PER_DIR:05d}"
            sub.mkdir(parents=True, exist_ok=True)
            img.save(sub / f"{key}.png", format="PNG")
            (sub / f"{key}.txt").write_text(caption, encoding="utf-8")
            (sub / f"{key}.cls").write_text(str(label), encoding="utf-8")
        else:
            img.save(out / "manifest_images" / f"{key}.png", format="PNG")
            rows.append([f"manifest_images/{key}.png", caption, label, scene["shape"], scene["color"],
                         scene["count"]])
    return rows, captions


def generate_demo_data(out: Path, num_images: int = 4000, image_size: int = 64, seed: int = 0,
                       num_documents: int = 2000, manifest_fraction: float = 0.5, task: str = "rich") -> dict:
    """Write the demo collection into `out` and return counts. Images 0..k-1 go to `folder/` (img2dataset
    "files" layout: KEY.png + KEY.txt caption + KEY.cls label), the rest to `manifest.csv` +
    `manifest_images/`, with k = round(num_images * (1 - manifest_fraction)). Image i depends only on
    (seed, i, task). `task` names the scenes drawn, images and corpus alike (TASKS: "rich" or
    "binding"). manifest.csv is written last, so its presence means a run finished."""
    out = Path(out)
    _check_args(out, num_images, image_size, num_documents, manifest_fraction, task)
    scenes = TASKS[task]
    # A rerun rebuilds from scratch: stale images from an earlier, larger run would otherwise leak in.
    (out / "manifest.csv").unlink(missing_ok=True)
    for sub in ("folder", "manifest_images"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "manifest_images").mkdir(parents=True)
    _write_text(out / "classes.txt", "".join(name + "\n" for name in CLASSES))
    corpus_rng = random.Random(f"demo-corpus:{seed}")
    _write_text(out / "corpus.txt", "".join(_document(corpus_rng, scenes) + "\n" for _ in range(num_documents)))

    num_folder = round(num_images * (1.0 - manifest_fraction))
    rows, captions = _write_images(out, num_images, num_folder, image_size, seed, scenes)
    tmp = out / ".manifest.csv.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "label", "shape", "color", "count"])
        writer.writerows(rows)
    os.replace(tmp, out / "manifest.csv")
    return {"images": num_images, "folder_images": num_folder, "manifest_images": len(rows),
            "documents": num_documents, "distinct_captions": len(captions), "classes": len(CLASSES),
            "task": task, "possible_scenes": scenes.scenes}
