"""What every command line shares: ``--help`` with defaults shown, ``--version``, its own name.

A leaf module (standard library only), so any layer's command (chat, generate, the server,
convert, random_checkpoint) builds its parser here without importing anything heavy.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (none for flags, unset options, or help that
    already says its default); descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is x for x in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number above 0 (else argparse's usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,63}$")


def named_adapter(text: str) -> tuple[str, str]:
    """An argparse ``type`` for ``--adapter NAME=PATH``."""
    name, sep, path = text.partition("=")
    if not sep or not path or not ADAPTER_NAME.match(name):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=PATH, NAME of letters, digits and ._:@/- (at most 64)")
    return name, path


def adapters_by_name(pairs) -> dict:
    """``--adapter`` values (``named_adapter``) -> ``{name: path}``; a name given twice exits."""
    out = {}
    for name, path in pairs or []:
        if name in out:
            raise SystemExit(f"error: --adapter {name!r} is given twice")
        out[name] = path
    return out


def version() -> str:
    """``mlx-lfm2 X (mlx Y)`` from the installed distributions."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(name):
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    return f"mlx-lfm2 {of('mlx-lfm2')} (mlx {of('mlx')}, Python {sys.version.split()[0]})"


def invocation(module: str) -> list[str]:
    """How this process was started, as a user would type it again: an installed script
    (``mlx-lfm2-chat``), ``python -m module`` for a file inside the package, else ``python FILE``."""
    prog = Path(sys.argv[0])
    if prog.suffix != ".py":
        return [prog.name or module]
    if PACKAGE in prog.resolve().parents:
        return ["python", "-m", module]
    return ["python", sys.argv[0]]


def parser(module: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser named after how it was invoked, with ``--version``; ``module`` is
    the ``python -m`` name of the command."""
    import textwrap

    description = "\n".join(textwrap.fill(line, 88) for line in description.split("\n"))
    p = argparse.ArgumentParser(prog=" ".join(invocation(module)), description=description, epilog=epilog,
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=version())
    return p
