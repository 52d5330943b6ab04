"""argparse types shared by the benchmark scripts: a wrong value is an argparse error that
lists what is allowed, never a run of something else under the wrong label.

Scripts run as ``python benchmarks/<name>.py`` have this folder on ``sys.path`` and import
it as ``_cli``. Example::

    add_names(parser, "--methods", ("lora", "dora"))
    parser.add_argument("--rounds", type=at_least(1), default=5)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable


def names(valid: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse ``type``: a comma-separated list of names, each one of ``valid``.

    Returns the list (in the given order, duplicates dropped).
    """
    valid = tuple(valid)

    def parse(text: str) -> list[str]:
        items = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        unknown = [s for s in items if s not in valid]
        if unknown or not items:
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "empty list"
            raise argparse.ArgumentTypeError(f"{what}; choose from {','.join(valid)}")
        return items

    parse.__name__ = "comma-separated list"  # argparse names the type in its messages
    return parse


def add_names(
    parser: argparse.ArgumentParser, flag: str, valid: Iterable[str], default: str | None = None
) -> None:
    """Adds ``flag``: a comma-separated list of ``valid`` names, default all of them."""
    valid = tuple(valid)
    default = ",".join(valid) if default is None else default
    parser.add_argument(
        flag,
        type=names(valid),
        default=default,
        help=f"comma-separated, of {','.join(valid)} (default: {default})",
    )


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def int_list(low: int) -> Callable[[str], list[int]]:
    """An argparse ``type``: a comma-separated list of integers, each ``>= low``."""
    one = at_least(low)

    def parse(text: str) -> list[int]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return [one(s) for s in items]

    parse.__name__ = "comma-separated integers"
    return parse


def probability_list(text: str) -> list[float]:
    """An argparse ``type``: a comma-separated list of dropout rates, each in [0, 1)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    out = []
    for s in items:
        try:
            p = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not 0 <= p < 1:
            raise argparse.ArgumentTypeError(f"a dropout rate is in [0, 1), got {p:g}")
        out.append(p)
    return out


def probability(text: str) -> float:
    """An argparse ``type``: one dropout rate in [0, 1)."""
    items = probability_list(text)
    if len(items) != 1:
        raise argparse.ArgumentTypeError(f"one number, got {text!r}")
    return items[0]


probability_list.__name__ = "comma-separated rates in [0, 1)"
probability.__name__ = "rate in [0, 1)"
