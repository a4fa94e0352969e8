"""`python -m mmpretrain ...` and `accelerate launch -m mmpretrain eval ...` run the CLI."""

import sys

from mmpretrain.cli import main

sys.exit(main())
