"""Exceptions that the CLI turns into exit codes.

``UserError`` is bad input or usage (exit 2): the message is one line meant for a person.
``CheckFailed`` is a numeric check that did not hold (exit 1).
"""

from __future__ import annotations

import re


class GconvError(Exception):
    """Base class for every error gconv-compile reports to a user."""

    exit_code = 2


class UserError(GconvError):
    """Bad input or usage: a model we cannot read, a path we must not write, a bad option."""

    exit_code = 2


class CheckFailed(GconvError):
    """The rewritten model does not compute what the input computes."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The exception's message as one line of at most ``limit`` characters.

    Whitespace runs (checkers and TVM spread one sentence over several lines) become one space;
    an empty message becomes the exception's type name.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tvm_message(exc: BaseException) -> str:
    """``Type: message`` of a TVM error, from the line that says what went wrong (TVM's text
    often starts with a C++ backtrace, which :func:`one_line` would keep)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    useful = [
        line for line in lines
        if not line.startswith(("Traceback", "File ", "File:", "at ", "[bt]", "#"))
        and not re.match(r"^\d+: ", line)
    ]  # fmt: skip
    text = (useful[0] if useful else (lines[0] if lines else type(exc).__name__))[:300]
    return f"{type(exc).__name__}: {text}"
