"""Prompt templates for zero-shot classification; ``{}`` is replaced by the class name.

Our own short set of generic photo prompts (not the OpenAI/open_clip ImageNet list). Each class
embedding is the re-normalised mean of its normalised prompt embeddings, so adding phrasings that
vary framing, lighting and quality averages those nuisances out. Pass a file with one template per
line (``--templates FILE``) for a dataset-specific set.
"""

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
