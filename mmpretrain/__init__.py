"""mmpretrain: CLIP-style image-text pretraining with a multitask text branch."""

__version__ = "0.1.0"
