"""Prompt templates and class-name sets for zero-shot classification, built in and from files.

A template holds ``{}`` or ``{c}`` (CLIP_benchmark's form) where the class name goes. Each class
embedding is the re-normalised mean of its normalised prompt embeddings, so phrasings that vary
framing, lighting and quality average those nuisances out.

Built-in template sets (``--templates NAME`` / ``eval.templates: NAME``):

* ``default``: our own 12 generic photo prompts (below);
* ``openai``: the 80 ImageNet prompts of the CLIP paper (OpenAI's Prompt_Engineering_for_ImageNet
  notebook), as open_clip and CLIP_benchmark ship them;
* ``openai-7``: the 7 of those 80 that notebook selected (open_clip's SIMPLE_IMAGENET_TEMPLATES).

Built-in class names (``--classnames NAME``): ``imagenet1k``, the 1000 ImageNet-1k names of that
notebook in label order (synset order, the order of class folders n01440764 ... n15075141), equal to
open_clip's IMAGENET_CLASSNAMES and CLIP_benchmark's imagenet1k list.
"""

from __future__ import annotations

import re

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a snapshot of the {}.",
    "an image that shows a {}.",
    "a close-up shot of a {}.",
    "the {}, seen from a distance.",
    "a well-lit photograph of a {}.",
    "a dim, grainy photo of the {}.",
    "a slightly out-of-focus picture of a {}.",
    "a small {} in the middle of the frame.",
    "a {} filling the whole picture.",
    "a {} in its usual surroundings.",
    "a cropped picture showing part of a {}.",
)
TEMPLATE_SETS = ("default", "openai", "openai-7")
CLASSNAME_SETS = ("imagenet1k",)
_SLOT = re.compile(r"\{c?\}")  # where the class name goes: {} or {c}


def has_slot(template: str) -> bool:
    return _SLOT.search(template) is not None


def fill(template: str, name: str) -> str:
    """The prompt for class `name`: every ``{}`` / ``{c}`` of `template` replaced by it."""
    return _SLOT.sub(lambda _: name, template)


def builtin_templates(name: str) -> list[str]:
    if name == "default":
        return list(DEFAULT_TEMPLATES)
    from open_clip import zero_shot_metadata as meta  # the lists live there; a lambda per template

    chosen = {"openai": meta.OPENAI_IMAGENET_TEMPLATES, "openai-7": meta.SIMPLE_IMAGENET_TEMPLATES}[name]
    return [make("{}") for make in chosen]


def builtin_classnames(name: str) -> list[str]:
    from open_clip import zero_shot_metadata as meta

    return {"imagenet1k": list(meta.IMAGENET_CLASSNAMES)}[name]
