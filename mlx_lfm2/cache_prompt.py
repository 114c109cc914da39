"""``python -m mlx_lfm2.cache_prompt``: the command keeps mlx-lm's name; the code lives in ``mlx_lfm2.cli``."""

from .cli.cache_prompt import main

if __name__ == "__main__":
    main()
