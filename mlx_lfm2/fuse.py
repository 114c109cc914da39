"""``python -m mlx_lfm2.fuse``: merge an adapter into its base (mlx-lm's command name); see ``mlx_lfm2.train.fuse``."""

import sys

from .train.fuse import main

if __name__ == "__main__":
    sys.exit(main())
