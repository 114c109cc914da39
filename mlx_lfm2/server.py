"""``python -m mlx_lfm2.server``: the command keeps its name; the app lives in ``mlx_lfm2.serve``."""

from .serve.app import main

if __name__ == "__main__":
    main()
