"""Training: config-driven trainer (trainer), the step and exact accumulation (step), optimizer and
schedule (optim), checkpoints (checkpoint), run logging (runlog), curves (plot).

Nothing is imported here, so `import mmpretrain.train.plot` (the CLI) does not pull in torch."""
