"""Lessons as data: a TOML file of numbered steps, each with text, commands and a checkpoint.

A teacher writes a lesson without Python (docs/lessons.md has the format); this module reads
one and checks everything it can before a class sees it: unknown keys, a checkpoint spec the
breakpoints do not understand, an explanation that names a number buselab cannot give. Every
error is one line naming the file and the step.
"""

from __future__ import annotations

import dataclasses
import string
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..steering.breakpoints import BreakpointError, parse_match
from .facts import FACTS

RUN_KINDS = ("split", "readahead")
SCOPES = ("step", "previous", "lesson")
DEFAULT_TIMEOUT = 120.0  # seconds a checkpoint may take under --auto before the lesson fails


class LessonError(UserError):
    """A lesson file that cannot be used, or a lesson that cannot go on; one line."""


@dataclass(frozen=True)
class Checkpoint:
    """What the step waits for; what it pauses on; what it says once it is there."""

    wait: str | None = None  # requests to see, in the breakpoints' language ("struct=journal,op=write")
    count: int = 1  # ... this many of them
    run: str | None = None  # or a run of requests: "split" or "readahead"
    in_flight: int | None = None  # or this many requests in flight at once
    pause: str | None = None  # a breakpoint: the device pauses on the first request it matches
    scope: str = "step"  # the requests looked at: since this step began, the step before it, or the lesson
    explain: str = ""  # text with {facts} filled from this run's requests (lessons/facts.py)
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class Step:
    title: str
    text: str = ""
    commands: tuple[str, ...] = ()  # shell commands for the other terminal ({dev}, {mnt}, {name})
    steer: tuple[str, ...] = ()  # buselab steering when the step begins, in `buselab ctl` words
    checkpoint: Checkpoint | None = None


@dataclass(frozen=True)
class Lesson:
    name: str
    title: str
    minutes: int
    summary: str
    steps: tuple[Step, ...]
    needs: tuple[str, ...] = ()  # tools the commands use (mkfs.ext4, fio, ...): checked before --auto
    path: str = ""
    cleanup: tuple[str, ...] = field(default=())  # commands run at the end of --auto, whatever happened


_LESSON_KEYS = {"title", "minutes", "summary", "step", "needs", "cleanup"}
_STEP_KEYS = {"title", "text", "commands", "steer", "checkpoint"}
_CHECKPOINT_KEYS = {"wait", "count", "run", "in_flight", "pause", "scope", "explain", "timeout"}
_COMMAND_FIELDS = {"dev", "mnt", "name", "size"}


def load_lesson(path: str | Path) -> Lesson:
    """Read and check a lesson file (TOML). LessonError says what is wrong, and where."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise LessonError(f"cannot read lesson {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LessonError(f"lesson {path} is not valid TOML: {exc}") from None
    return lesson_from_dict(data, name=path.stem, where=str(path))


def lesson_from_dict(data: dict, *, name: str, where: str) -> Lesson:
    _no_unknown(data, _LESSON_KEYS, where)
    steps_data = data.get("step")
    if not isinstance(steps_data, list) or not steps_data:
        raise LessonError(f"{where}: a lesson needs at least one [[step]]")
    steps = tuple(_step(s, f"{where}, step {i} ") for i, s in enumerate(steps_data, 1))
    title = _text(data, "title", where, required=True)
    minutes = data.get("minutes", 10)
    if not isinstance(minutes, int) or minutes <= 0:
        raise LessonError(f"{where}: minutes must be a whole number more than 0, got {minutes!r}")
    return Lesson(
        name=name,
        title=title,
        minutes=minutes,
        summary=_text(data, "summary", where),
        steps=steps,
        needs=_strings(data, "needs", where),
        path=where,
        cleanup=tuple(_command(c, where) for c in _strings(data, "cleanup", where)),
    )


def _step(data: object, where: str) -> Step:
    if not isinstance(data, dict):
        raise LessonError(f"{where}: a step is a table with a title")
    where = f"{where}({data.get('title', 'untitled')!r})"
    _no_unknown(data, _STEP_KEYS, where)
    checkpoint = data.get("checkpoint")
    return Step(
        title=_text(data, "title", where, required=True),
        text=reflow(_text(data, "text", where)),
        commands=tuple(_command(c, where) for c in _strings(data, "commands", where)),
        steer=_strings(data, "steer", where),
        checkpoint=_checkpoint(checkpoint, where) if checkpoint is not None else None,
    )


def _checkpoint(data: object, where: str) -> Checkpoint:
    if not isinstance(data, dict):
        raise LessonError(f"{where}: checkpoint is a table (wait = ..., explain = ...)")
    _no_unknown(data, _CHECKPOINT_KEYS, f"{where} checkpoint")
    for key in ("wait", "pause"):
        spec = data.get(key)
        if spec is not None:
            try:
                parse_match(str(spec), what="checkpoint")
            except BreakpointError as exc:
                raise LessonError(f"{where}: checkpoint {key} = {spec!r}: {exc}") from None
    run = data.get("run")
    if run is not None and run not in RUN_KINDS:
        raise LessonError(f"{where}: checkpoint run = {run!r}: use one of {', '.join(RUN_KINDS)}")
    scope = data.get("scope", "step")
    if scope not in SCOPES:
        raise LessonError(f"{where}: checkpoint scope = {scope!r}: use one of {', '.join(SCOPES)}")
    count = data.get("count", 1)
    if not isinstance(count, int) or count < 1:
        raise LessonError(f"{where}: checkpoint count must be a whole number of at least 1, got {count!r}")
    in_flight = data.get("in_flight")
    if in_flight is not None and (not isinstance(in_flight, int) or in_flight < 1):
        raise LessonError(f"{where}: checkpoint in_flight must be a whole number of at least 1, got {in_flight!r}")
    if not any(data.get(k) is not None for k in ("wait", "run", "in_flight", "pause")):
        raise LessonError(f"{where}: a checkpoint waits for something: give wait, run, in_flight or pause")
    explain = reflow(_text(data, "explain", where))
    unknown = sorted({f for f in _fields(explain, where) if f not in FACTS})
    if unknown:
        raise LessonError(
            f"{where}: explain names {', '.join('{' + f + '}' for f in unknown)}, which buselab does not measure"
            " (docs/lessons.md lists the facts)"
        )
    timeout = data.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise LessonError(f"{where}: checkpoint timeout must be a number of seconds more than 0, got {timeout!r}")
    return Checkpoint(
        wait=data.get("wait"),
        count=count,
        run=run,
        in_flight=in_flight,
        pause=data.get("pause"),
        scope=scope,
        explain=explain,
        timeout=float(timeout),
    )


def reflow(text: str) -> str:
    """Paragraphs (blank-line separated) each on one line: the pane wraps them to its width."""
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _command(text: str, where: str) -> str:
    unknown = sorted({f for f in _fields(text, where) if f not in _COMMAND_FIELDS})
    if unknown:
        raise LessonError(
            f"{where}: command {text!r} names {', '.join('{' + f + '}' for f in unknown)}:"
            f" commands know {', '.join('{' + f + '}' for f in sorted(_COMMAND_FIELDS))}"
        )
    return text


def _fields(text: str, where: str) -> list[str]:
    try:
        return [name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(text) if name]
    except ValueError as exc:
        raise LessonError(f"{where}: {text[:40]!r}...: {exc} (write {{{{ and }}}} for braces)") from None


def _no_unknown(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise LessonError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _text(data: dict, key: str, where: str, required: bool = False) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise LessonError(f"{where}: {key} must be {'a non-empty' if required else 'a'} string")
    return value


def _strings(data: dict, key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LessonError(f"{where}: {key} must be a list of strings")
    return tuple(value)


# -- the lessons that ship with buselab ---------------------------------------------------------


def builtin_paths() -> dict[str, Path]:
    """name -> file of every lesson in buselab/lessons/data, in teaching order (the file names' prefix)."""
    root = resources.files(__package__) / "data"
    files = sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml"))
    return {path.stem.split("-", 1)[-1]: path for path in files}


def find_lesson(name: str) -> Lesson:
    """A built-in lesson by name, or a lesson file by path."""
    paths = builtin_paths()
    if name in paths:
        return dataclasses.replace(load_lesson(paths[name]), name=name)
    if name.endswith(".toml") or "/" in name:
        return load_lesson(name)
    raise LessonError(f"no lesson called {name!r}: the lessons are {', '.join(paths)} (or give a .toml file)")
