"""The argparse tree as data, for the man page and the shell completions.

Both are generated from the parser itself (cli.build_parser), so a new option or
subcommand appears in them without anyone remembering to add it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field

# Metavars that name a file or a device: completed as file names.
PATH_METAVARS = {"FILE", "PATH", "DEVICE", "DIR", "FILE[:CLASS]", "TRACE", "IMAGE"}


@dataclass
class Command:
    words: list[str]  # e.g. ["buselab", "ctl", "break"]
    parser: argparse.ArgumentParser
    help: str = ""
    aliases: list[str] = field(default_factory=list)
    subcommands: list[Command] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " ".join(self.words)

    @property
    def options(self) -> list[argparse.Action]:
        return [a for a in self.parser._actions if a.option_strings and a.help != argparse.SUPPRESS]

    @property
    def positionals(self) -> list[argparse.Action]:
        return [
            a
            for a in self.parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction) and a.help != argparse.SUPPRESS
        ]

    def walk(self) -> Iterator[Command]:
        yield self
        for sub in self.subcommands:
            yield from sub.walk()


def command_tree(
    parser: argparse.ArgumentParser,
    words: list[str] | None = None,
    help: str = "",
    grafts: dict[str, argparse.ArgumentParser] | None = None,
) -> Command:
    """The tree under `parser`. `grafts` maps a subcommand that parses the rest of its line
    itself (`ctl` takes [PATH|PID] first) to the parser it uses: its subcommands are shown."""
    words = words or [parser.prog.split()[0]]
    node = Command(words, parser, help)
    grafts = grafts or {}
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        seen: dict[int, Command] = {}
        for name, subparser in action.choices.items():
            if id(subparser) in seen:  # an alias (argparse lists it as its own key)
                seen[id(subparser)].aliases.append(name)
                continue
            child = command_tree(subparser, [*words, name], helps.get(name, ""))
            if name in grafts:
                child.subcommands = command_tree(grafts[name], [*words, name]).subcommands
            seen[id(subparser)] = child
            node.subcommands.append(child)
    return node


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def is_path(action: argparse.Action) -> bool:
    return str(action.metavar or "").upper() in PATH_METAVARS
