"""``python -m mlx_lfm2.generate``: the command keeps mlx-lm's name; the code lives in ``mlx_lfm2.cli``.

``mlx_lfm2.generate`` the attribute stays the generation *function*: the package keeps an
import of this module from rebinding it (see ``mlx_lfm2/__init__.py``).
"""

from .cli.generate import main

if __name__ == "__main__":
    main()
