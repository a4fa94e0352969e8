"""`accelerate launch -m mmpretrain.train --config X.yaml [section.key=value ...]` (and `python -m`)."""

import sys

from mmpretrain.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
