"""`mmpretrain export`: a run/checkpoint as an open_clip model directory (+ text heads)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run/checkpoint as an open_clip model directory (+ text heads)")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="run directory (its newest checkpoint), checkpoint directory, exported directory, "
                        "or open_clip weights file (with --model)")
    p.add_argument("--model", help="architecture of an open_clip weights file: shipped model name, .json, "
                                   "open_clip_config.json, or open_clip model name")
    p.add_argument("--out", required=True, help="directory to write (open_clip local-dir: layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--stock-vocab", action="store_true",
                   help="write the open_clip config the model came from (the stock JSON, open_clip_config.json or "
                        "open_clip name it was trained or loaded with, remembered in the checkpoint; else open_clip's "
                        "stock CLIP layout): vocab_size 49408, default pooling, no <mask>/<sep> rows and no text "
                        "heads, so open_clip.create_model(THAT_CONFIG, pretrained=FILE) loads it strictly")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from mmpretrain.checkpoint.load import load_model
    from mmpretrain.models.export import export_model

    loaded = load_model(args.checkpoint, args.model)
    out = export_model(loaded.model, loaded.model_config, loaded.heads, args.out, overwrite=args.overwrite,
                       provenance={"source": loaded.path, "source_kind": loaded.kind, "step": loaded.step},
                       stock_vocab=args.stock_vocab, original=loaded.original)
    if args.stock_vocab:
        origin = loaded.original["source"] if loaded.original else "open_clip's stock CLIP text layout"
        print(f"exported {loaded.kind} {loaded.path} to {out} in the layout of {origin} (vocab_size 49408, no text "
              f"heads); load it with open_clip.create_model(THAT_CONFIG, pretrained='{out}/open_clip_model.safetensors') "
              f"or open_clip.create_model_and_transforms('local-dir:{out}')")
        return 0
    heads = [h for h, on in vars(loaded.heads).items() if on]
    print(f"exported {loaded.kind} {loaded.path} to {out} (heads: {', '.join(heads) or 'none'}); "
          f"load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0
