"""`mmpretrain train`: one process; the same code runs under `accelerate launch -m mmpretrain.train`."""

from __future__ import annotations


def add_parser(sub) -> None:
    from mmpretrain.config.docs import format_key_docs

    p = sub.add_parser("train", help="train from a config (one process; the same code runs under "
                                     "`accelerate launch -m mmpretrain.train`)",
                       epilog="config keys (set in the YAML or as section.key=value overrides):\n\n"
                              + format_key_docs())
    p.add_argument("--config", required=True, help="configs/train/NAME.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, values in YAML (train.steps=100 data.train_shards=[a,b])")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from mmpretrain.config import load_config, require_training_data

    cfg = load_config(args.config, args.overrides)
    require_training_data(cfg)  # before the model is built: a missing key costs a second, not a ViT-B
    from mmpretrain.train.trainer import Trainer

    trainer = Trainer(cfg)
    metrics = trainer.fit()
    if trainer.accelerator.is_main_process:
        loss = f"loss {metrics['loss']:.4f}, " if metrics else ""
        print(f"trained to step {trainer.step}: {loss}run directory {cfg.train.output_dir} "
              f"(evaluate it with `mmpretrain eval retrieval --checkpoint {cfg.train.output_dir} --shards ...`)")
    return 0
