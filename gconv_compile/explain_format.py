"""Small text formatters shared by the ``explain`` modules: joined numbers, wrapped paragraphs
and long lists cut down to a screen."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

# Width of the "gconv-compile: error: " prefix the CLI puts before a UserError message.
ERROR_PREFIX = 22
WRAP = 100
# Group lists longer than this show the first three groups and the last one.
MAX_LISTED_GROUPS = 6


def paragraph(text: str) -> str:
    """Wrap a message to the terminal width the CLI prints it at."""
    lines = textwrap.wrap(text, width=WRAP, initial_indent="#" * ERROR_PREFIX)
    if not lines:
        return text
    lines[0] = lines[0][ERROR_PREFIX:]
    return "\n".join(lines)


def join_commas(values: Sequence[int]) -> str:
    """``1, 2, 4``."""
    return ", ".join(str(v) for v in values)


def join_x(values: Iterable[int]) -> str:
    """``3x3``."""
    return "x".join(str(v) for v in values)


def collapse(items: Sequence[Any]) -> list[Any | None]:
    """Long lists show their first three items, a None placeholder and the last."""
    if len(items) <= MAX_LISTED_GROUPS:
        return list(items)
    return [*items[:3], None, items[-1]]
