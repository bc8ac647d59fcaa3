"""The control protocol: one JSON object per line, each way.

Request:   {"cmd": "step", "fail": "EIO", "id": 7}
Reply:     {"ok": true, "result": {...}, "id": 7}
           {"ok": false, "error": "bad errno 'EFOO': NBD can send EPERM, EIO, ...", "id": 7}

`id` is optional and echoed. A line that is not JSON is read as words, for
`nc -U`/`socat` demos: `pause`, `step fail=EIO`, `break add op=flush`,
`switch file /tmp/disk.img` -- the first word (or two) name the command,
`key=value` words are arguments, other words fill the command's positional
arguments in order.

Commands (arguments; positional ones in order):
    status                              everything below in one object
    pause | resume
    step      [fail=ERRNO | delay=MS] [wait=SECONDS]
    held                                the held requests, oldest first
    wait      [count=1] [timeout=10]    until COUNT requests are held
    break.add SPEC | break.list | break.rm REF|all | break.enable REF | break.disable REF | break.toggle REF
                                        REF is a breakpoint id
    filter.add SPEC [position=N] | filter.list | filter.rm REF|all | filter.enable REF | filter.disable REF
    filter.toggle REF                   REF is a filter id or name
    switch    KIND [PATH] [size=SIZE] [copy=true] [overwrite=false]
                                        overwrite: copy over a file or an NBD export that holds data, or a block device
    powercut                            a crash: the cache's unflushed writes are lost, every request fails (EIO)
    poweron                             ... until the power is back
    cow.commit | cow.discard
    events    [after=EPOCH] [limit=50]
    stop                                stop the server (answered first; the device is detached)
    watch     [hz=12] [rows=250]        this connection then carries telemetry frames (see watch.py)
    viewers                             the watching connections: frames sent, ticks dropped, bytes held
    help
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..steering import Steering, SteeringError
from ..steering.results import Result, to_json
from ..storage.registry import FilterSpecError
from ..storage.spec import parse_bool

MAX_LINE = 1 << 20


@dataclass(frozen=True)
class ControlTarget:
    """What the control socket steers: the session's steering, and its status (which knows where it serves)."""

    steering: Steering
    status: Callable[[], Result]
    stop: Callable[[], None] | None = None  # asks the session to stop (SIGTERM's way); None: refused
    viewers: Callable[[], list[dict[str, Any]]] = list  # the attached labs' streams (the server's)


def _remove_filter(s: Steering, ref: Any) -> Any:
    """One filter's info, or for `all` {"removed": [ids]} (as break.rm answers)."""
    if str(ref).strip().lower() == "all":
        return s.remove_all_filters()
    return s.remove_filter(ref)


def _step(s: Steering, a: dict) -> Any:
    fail = a.pop("fail", None)
    delay = a.pop("delay", a.pop("delay_ms", None))
    action = a.pop("action", None)
    errno = a.pop("errno", None)
    if fail is not None and delay is not None:
        raise SteeringError("step takes fail= or delay=, not both")
    if fail is not None:
        action, errno = "fail", (errno if fail is True else fail)
    elif delay is not None:
        action = "delay"
    return s.step(action or "release", errno=errno, delay_ms=delay, wait=a.pop("wait", 0.0))


def _switch(s: Steering, a: dict) -> Any:
    kind = a.pop("kind", None)
    if not kind:
        raise SteeringError("switch needs a backend: ram, file PATH, cow [PATH], null or plugin FILE[:CLASS]")
    return s.switch_backend(
        kind,
        a.pop("path", None),
        size=a.pop("size", None),
        copy=_bool(a.pop("copy", True)),
        overwrite=_bool(a.pop("overwrite", False)),
    )


def _bool(value: Any) -> bool:
    try:
        return parse_bool(value)
    except UserError as exc:
        raise SteeringError(str(exc)) from None


def _need(a: dict, key: str, cmd: str) -> Any:
    value = a.pop(key, None)
    if value is None or value == "":
        raise SteeringError(f"{cmd} needs {key.upper()}")
    return value


Handler = Callable[[Steering, dict], Any]

# name -> (positional argument names, handler). Handlers pop what they use;
# anything left over is refused, so a typo never passes silently. `status` is
# the session's (see dispatch): steering does not know where it is served.
COMMANDS: dict[str, tuple[tuple[str, ...], Handler]] = {
    "status": ((), lambda s, a: s.status()),
    "pause": ((), lambda s, a: s.pause()),
    "resume": ((), lambda s, a: s.resume()),
    "step": ((), _step),
    "held": ((), lambda s, a: s.held()),
    "wait": ((), lambda s, a: s.wait_held(a.pop("count", 1), a.pop("timeout", 10.0))),
    "break.add": (("spec",), lambda s, a: s.add_breakpoint(_need(a, "spec", "break add"))),
    "break.list": ((), lambda s, a: s.list_breakpoints()),
    "break.rm": (("ref",), lambda s, a: s.remove_breakpoint(_need(a, "ref", "break rm"))),
    "break.enable": (("ref",), lambda s, a: s.set_breakpoint_enabled(_need(a, "ref", "break enable"), True)),
    "break.disable": (("ref",), lambda s, a: s.set_breakpoint_enabled(_need(a, "ref", "break disable"), False)),
    "break.toggle": (("ref",), lambda s, a: s.toggle_breakpoint(_need(a, "ref", "break toggle"))),
    "filter.add": (
        ("spec", "position"),
        lambda s, a: s.add_filter(str(_need(a, "spec", "filter add")), a.pop("position", None)),
    ),
    "filter.list": ((), lambda s, a: s.list_filters()),
    "filter.rm": (("ref",), lambda s, a: _remove_filter(s, _need(a, "ref", "filter rm"))),
    "filter.enable": (
        ("ref",),
        lambda s, a: s.set_filter_enabled(_need(a, "ref", "filter enable"), True),
    ),
    "filter.disable": (
        ("ref",),
        lambda s, a: s.set_filter_enabled(_need(a, "ref", "filter disable"), False),
    ),
    "filter.toggle": (("ref",), lambda s, a: s.toggle_filter(_need(a, "ref", "filter toggle"))),
    "switch": (("kind", "path"), _switch),
    "powercut": ((), lambda s, a: s.powercut()),
    "poweron": ((), lambda s, a: s.poweron()),
    "cow.commit": ((), lambda s, a: s.cow_commit()),
    "cow.discard": ((), lambda s, a: s.cow_discard()),
    "events": ((), lambda s, a: s.events(float(a.pop("after", 0.0)), int(a.pop("limit", 50)))),
    "stop": ((), lambda s, a: None),  # the session's (see dispatch)
    "watch": ((), lambda s, a: None),
    "viewers": (
        (),
        lambda s, a: None,
    ),  # the server's (see dispatch)  # the server's (see ControlServer._serve): not a one-line answer
    "help": ((), lambda s, a: sorted(COMMANDS)),
}
_ALIASES = {
    "break.remove": "break.rm",
    "break.delete": "break.rm",
    "break.del": "break.rm",
    "break.ls": "break.list",
    "filter.remove": "filter.rm",
    "filter.ls": "filter.list",
    "power-cut": "powercut",
    "power.cut": "powercut",
    "power-on": "poweron",
    "power.on": "poweron",
    "commit": "cow.commit",
    "discard": "cow.discard",
    "continue": "resume",
}


def command_name(text: str) -> str:
    name = str(text).strip().lower().replace(" ", ".").replace("_", ".")
    return _ALIASES.get(name, name)


def parse_text_line(line: str) -> dict[str, Any]:
    """'break add op=flush' -> {'cmd': 'break.add', 'spec': 'op=flush'} (the words form)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise SteeringError(f"cannot read {line.strip()!r}: {exc}") from None
    if not words:
        raise SteeringError("an empty command: try help")
    name = command_name(words[0])
    rest = words[1:]
    if rest and command_name(f"{words[0]}.{words[1]}") in COMMANDS:
        name, rest = command_name(f"{words[0]}.{words[1]}"), words[2:]
    message: dict[str, Any] = {"cmd": name}
    positional = list(COMMANDS.get(name, ((), None))[0])
    loose = []
    for word in rest:
        key, sep, value = word.partition("=")
        # Specs contain '=' too (break add op=flush): only known keys are arguments.
        if sep and key in _ARGUMENT_KEYS and not (positional and positional[0] == "spec"):
            message[key] = value
        else:
            loose.append(word)
    if loose and positional and positional[0] == "spec":
        message["spec"] = ",".join(loose)
    else:
        for word in loose:
            if not positional:
                raise SteeringError(f"{name} does not take {word!r}")
            message[positional.pop(0)] = word
    return message


_ARGUMENT_KEYS = {
    "fail", "delay", "delay_ms", "wait", "action", "errno", "count", "timeout", "position",
    "size", "copy", "overwrite", "after", "limit", "ref", "kind", "path", "hz", "rows",
}  # fmt: skip


def dispatch(target: ControlTarget, message: dict[str, Any]) -> Any:
    """Run one command; its JSON-able result. Raises UserError (one line) for bad input."""
    args = {k: v for k, v in message.items() if k not in ("cmd", "id")}
    name = command_name(message.get("cmd", ""))
    entry = COMMANDS.get(name)
    if entry is None:
        raise SteeringError(f"unknown command {message.get('cmd')!r}: try one of {', '.join(sorted(COMMANDS))}")
    _, handler = entry
    try:
        if name == "stop":
            result = _stop(target)
        elif name == "viewers":
            result = target.viewers()
        elif name == "watch":
            raise SteeringError("watch starts a stream of frames: send it as the first line of a connection")
        else:
            result = target.status() if name == "status" else handler(target.steering, args)
    except FilterSpecError as exc:
        raise SteeringError(exc.worded("filter")) from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise SteeringError(f"bad arguments for {name}: {exc}") from None
    if args:
        raise SteeringError(f"{name} does not take {', '.join(sorted(args))}")
    return to_json(result)


STOPPING = {"stopping": True}


def _stop(target: ControlTarget) -> dict[str, bool]:
    """Refused without a way to stop; else the answer, which the server sends before it stops
    (see ControlServer._serve: stopping first could close this very connection unanswered)."""
    if target.stop is None:
        raise SteeringError("this buselab cannot be stopped over its control socket")
    return dict(STOPPING)


def watch_request(line: bytes | str) -> dict[str, Any] | None:
    """The arguments of a `watch` line (a connection's first), or None if it is another command."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    try:
        message = json.loads(text) if text.lstrip().startswith("{") else parse_text_line(text)
    except (json.JSONDecodeError, UserError):
        return None
    if not isinstance(message, dict) or command_name(message.get("cmd", "")) != "watch":
        return None
    return {k: v for k, v in message.items() if k not in ("cmd", "id")}


def handle_line(target: ControlTarget, line: bytes | str) -> dict[str, Any]:
    """One request line in, one reply object out; never raises for bad input."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    message: Any = None
    try:
        if text.lstrip().startswith("{"):
            try:
                message = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SteeringError(f"not a JSON object: {exc}") from None
            if not isinstance(message, dict):
                raise SteeringError('a request is a JSON object such as {"cmd": "status"}')
        else:
            message = parse_text_line(text)
        reply: dict[str, Any] = {"ok": True, "result": dispatch(target, message)}
    except UserError as exc:
        reply = {"ok": False, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    if isinstance(message, dict) and "id" in message:
        reply["id"] = message["id"]
    return reply


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, default=_jsonable).encode() + b"\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)
