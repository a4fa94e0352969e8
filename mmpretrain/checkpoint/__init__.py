"""Checkpoints: the layout of a run folder (layout), checkpoint.json (meta), training state saved and
restored (state), and every stored form of a model loaded for evaluation or export (load)."""
