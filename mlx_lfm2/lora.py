"""``python -m mlx_lfm2.lora``: fine-tuning (mlx-lm's command name); the work is in ``mlx_lfm2.train``."""

import sys

from .train.lora_cli import main

if __name__ == "__main__":
    sys.exit(main())
