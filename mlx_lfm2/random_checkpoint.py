"""``python -m mlx_lfm2.random_checkpoint``: the command keeps its name; the code lives in ``mlx_lfm2.weights``."""

from .weights.random_checkpoint import main

if __name__ == "__main__":
    main()
