"""buselab(1) in roff, generated from the argument parser: `buselab man > buselab.1; man -l buselab.1`."""

from __future__ import annotations

import argparse
import datetime
import os

from . import __version__
from .cliwalk import Command, command_tree

_TAIL = r"""
.SH "SOCKET ACTIVATION"
With LISTEN_PID and LISTEN_FDS set for it (systemd's socket units, libnbd's
.B nbdinfo \-\- [ buselab ram ]
syntax), buselab serves on the sockets it was handed and needs no
.B \-\-listen
or
.BR \-\-unix .
The variables are removed before any command runs.
.SH "CAPTIVE MODE"
.B \-\-run
.I CMD
runs
.I CMD
through /bin/sh once the disk is served, with
.BR $uri " (also " $nbd "), " $port ", " $unixsocket ", " $exportname
and, with a kernel device,
.BR $dev " (and " $nbd ")"
set. buselab stops when it exits and exits with its status (128+N if signal N ended it).
Without
.B \-\-listen
or
.B \-\-unix
the disk is served on a private Unix socket.
.SH "EXIT STATUS"
0 after a clean stop; 1 when no command was given (the help is printed);
2 for a usage error or anything else a user can fix (one line on stderr);
with
.BR \-\-run ,
the command's status.
.SH "SEE ALSO"
.BR nbdkit (1),
.BR qemu\-nbd (8),
.BR nbdinfo (1),
.BR nbdcopy (1),
.BR nbd\-client (8)
"""


def escape(text: str) -> str:
    """Text safe in a roff body: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def _usage(command: Command) -> str:
    usage = command.parser.format_usage().strip()
    return " ".join(usage.removeprefix("usage:").split())


def _option_lines(command: Command) -> list[str]:
    lines = []
    for action in command.options:
        names = ", ".join(action.option_strings)
        if action.nargs != 0:
            names += " " + str(action.metavar or action.dest.upper())
        lines += [".TP", f".B {escape(names)}", escape(_help(action))]
    for action in command.positionals:
        lines += [".TP", f".I {escape(str(action.metavar or action.dest))}", escape(_help(action))]
    return lines


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices and "{" not in text:
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return text % {"default": action.default} if "%(default)" in text else text


def manpage(
    parser: argparse.ArgumentParser,
    today: datetime.date | None = None,
    grafts: dict[str, argparse.ArgumentParser] | None = None,
) -> str:
    """The page; `grafts` as cliwalk.command_tree's."""
    tree = command_tree(parser, grafts=grafts)
    if today is None and os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():  # reproducible builds
        today = datetime.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), datetime.UTC).date()
    date = (today or datetime.date.today()).isoformat()
    out = [
        f'.TH BUSELAB 1 "{date}" "buselab {__version__}" "User Commands"',
        ".SH NAME",
        f"buselab \\- {escape(parser.description or '')}",
        ".SH SYNOPSIS",
        f".B buselab\n{escape(_usage(tree).removeprefix('buselab').strip())}",
        ".SH DESCRIPTION",
        escape(
            "buselab serves a disk over NBD (TCP or a Unix socket) or as a kernel device /dev/nbdN, "
            "with a live terminal lab that shows every request and can pause, step and steer them. "
            "Run a COMMAND with --help for its options; each is also below."
        ),
        ".SH OPTIONS",
        *_option_lines(tree),
        ".SH COMMANDS",
    ]
    for command in tree.walk():
        if command is tree:
            continue
        title = command.name + (f" (alias: {', '.join(command.aliases)})" if command.aliases else "")
        out += [f'.SS "{escape(title)}"', escape(command.help or command.parser.description or "")]
        out += [".PP", f".B {escape(_usage(command))}"]
        out += _option_lines(command)
    return "\n".join(out) + "\n" + _TAIL.lstrip("\n")
