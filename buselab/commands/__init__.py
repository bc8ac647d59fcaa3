"""Extra subcommands. Each module here has `register(subparsers)`; cli.py finds them.

This package also holds what every subcommand shares: `ArgumentParser`, whose
errors are one `buselab: error:` line (exit 2) instead of argparse's usage dump.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import UserError

_EXPECTED_VALUE = re.compile(r"^argument (\S+): expected one argument$")


class UsageError(UserError):
    """A command line argparse could not read; the message names the --help to see."""


def help_command(prog: str) -> str:
    """'buselab ctl [PATH|PID] break add' -> 'buselab ctl break add --help'."""
    return " ".join(word for word in prog.split() if word != "[PATH|PID]") + " --help"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError (one line, exit 2 in cli.main), not usage + exit.

    Subparsers made with `add_subparsers()` are of the same class, so every
    subcommand's errors come out the same way.
    """

    _argv: list[str] = []

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)  # for error(): what this parser was given
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self._explain(message)} (see `{help_command(self.prog)}`)")

    def _explain(self, message: str) -> str:
        """`--size -5M`: argparse takes -5M for an option and says only 'expected one argument'."""
        match = _EXPECTED_VALUE.match(message)
        if not match:
            return message
        names = match.group(1).split("/")
        for option, value in zip(self._argv, self._argv[1:]):
            if option in names and value.startswith("-"):
                return (
                    f"argument {option}: expected a value, got {value!r}, which reads as an option"
                    f" (if it is the value, write {option}={value})"
                )
        return message
