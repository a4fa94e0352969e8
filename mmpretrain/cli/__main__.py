"""`python -m mmpretrain.cli ...`, the same as `mmpretrain ...`."""

import sys

from mmpretrain.cli import main

sys.exit(main())
