"""`buselab ctl`: steer a running buselab through its control socket.

    buselab ctl [PATH|PID] status
    buselab ctl [PATH|PID] pause | resume
    buselab ctl [PATH|PID] step [--fail ERRNO | --delay MS] [--wait SECONDS]
    buselab ctl [PATH|PID] held | wait [--count N] [--timeout SECONDS]
    buselab ctl [PATH|PID] break add SPEC | break list | break rm ID|all | break enable|disable|toggle ID
    buselab ctl [PATH|PID] filter add SPEC [--position N] | filter list | filter rm REF|all | filter enable|disable|toggle REF
    buselab ctl [PATH|PID] switch ram|file|cow|null|plugin|nbd [PATH|URI] [--size SIZE] [--no-copy] [--overwrite]
    buselab ctl [PATH|PID] powercut | poweron
    buselab ctl [PATH|PID] cow commit | cow discard
    buselab ctl [PATH|PID] events [--limit N]

Without PATH, the one buselab this user runs is found by its default socket.
`--json` prints the server's reply object as it came, for scripts. Like every
buselab error, a command the server refuses, a usage mistake and a socket that
cannot be reached each print one line starting with `buselab: error:` and exit
with 2 (with --json a refusal prints the reply, {"ok": false, ...}, and exits 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..errors import UserError
from ..sizes import human_bytes, latency_text
from . import ArgumentParser, UsageError

COMMAND_WORDS = {
    "status", "pause", "resume", "continue", "step", "held", "wait", "break", "filter",
    "switch", "powercut", "poweron", "cow", "events", "help", "stop", "viewers",
}  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ctl",
        help="steer a running buselab: pause, step, breakpoints, filters, switch backends",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", dest="ctl_help", help="show this help")
    p.add_argument("--json", action="store_true", dest="ctl_json", help="print the reply as JSON")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="[PATH|PID] COMMAND [ARGS]")
    p.set_defaults(func=cmd_ctl)


def build_ctl_parser() -> argparse.ArgumentParser:
    common = ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not undo a --json given before it.
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the reply as JSON")
    common.add_argument("--socket-timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser = ArgumentParser(
        prog="buselab ctl [PATH|PID]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", parents=[common], help="backend, pause state, held requests, filters, breakpoints")
    sub.add_parser("pause", parents=[common], help="hold every request that arrives")
    sub.add_parser("resume", aliases=["continue"], parents=[common], help="release everything held, in order")
    p = sub.add_parser("step", parents=[common], help="release the oldest held request")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--fail", metavar="ERRNO", help="fail it with ERRNO (EIO, ENOSPC, EPERM, ...) instead")
    how.add_argument("--delay", metavar="MS", type=float, help="run it MS milliseconds late")
    p.add_argument("--wait", metavar="SECONDS", type=float, default=0.0, help="wait for a request to be held")
    sub.add_parser("held", parents=[common], help="list the held requests, oldest first")
    p = sub.add_parser("wait", parents=[common], help="wait until requests are held")
    p.add_argument("--count", type=int, default=1, help="how many (default 1)")
    p.add_argument("--timeout", dest="wait_timeout", type=float, default=10.0, help="seconds (default 10)")
    p = sub.add_parser("break", parents=[common], help="breakpoints: add SPEC | list | rm | enable | disable")
    bsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = bsub.add_parser(
        "add",
        parents=[common],
        help="e.g. op=flush | op=write+fua | range=0-1M | blocks=0-7 | pattern=53ef,at=1080 | ext4-sb",
    )
    b.add_argument("spec", nargs="+", metavar="SPEC")
    bsub.add_parser("list", aliases=["ls"], parents=[common])
    for name in ("rm", "enable", "disable", "toggle"):
        b = bsub.add_parser(name, parents=[common], aliases=["remove"] if name == "rm" else [])
        b.add_argument("ref", metavar="ID" + ("|all" if name == "rm" else ""))
    p = sub.add_parser("filter", parents=[common], help="filters: add SPEC | list | rm | enable | disable | toggle")
    fsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = fsub.add_parser("add", parents=[common], help="e.g. delay:read=5ms | error:rate=0.1,errno=EIO | cache")
    f.add_argument("spec", metavar="SPEC")
    f.add_argument("--position", type=int, help="0 is lowest (nearest the backend); default: on top")
    fsub.add_parser("list", aliases=["ls"], parents=[common])
    for name in ("rm", "enable", "disable", "toggle"):
        f = fsub.add_parser(name, parents=[common], aliases=["remove"] if name == "rm" else [])
        f.add_argument("ref", metavar="ID|NAME" + ("|all" if name == "rm" else ""))
    p = sub.add_parser("switch", parents=[common], help="switch the backend live, copying the disk into it")
    p.add_argument("kind", metavar="BACKEND", help="ram, file (lo), cow, null, plugin or nbd")
    p.add_argument(
        "path", nargs="?", metavar="PATH", help="file for file/cow, FILE[:CLASS] for plugin, nbd://HOST/NAME for nbd"
    )
    p.add_argument("--size", help="size of a new ram/null/file backend (default: the disk's)")
    p.add_argument("--no-copy", action="store_true", help="do not copy the current contents")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="copy even over a file that holds data, a block device or an NBD export with data (refused without it)",
    )
    sub.add_parser(
        "powercut",
        parents=[common],
        help="a crash: lose every write the cache filter holds since the last FLUSH; requests fail until poweron",
    )
    sub.add_parser("poweron", parents=[common], help="the power back after a powercut: serve again")
    p = sub.add_parser("cow", parents=[common], help="cow commit | cow discard")
    p.add_argument("action", choices=["commit", "discard"])
    p = sub.add_parser("events", parents=[common], help="recent events (switches, breakpoints, connections)")
    p.add_argument("--limit", type=int, default=20)
    sub.add_parser("stop", parents=[common], help="stop the server (as SIGTERM: in-flight requests are answered)")
    sub.add_parser("viewers", parents=[common], help="attached labs (buselab attach): frames, dropped, bytes held")
    return parser


def _split_target(argv: list[str]) -> tuple[str | None, list[str]]:
    """[PATH|PID] COMMAND ... -> (target, rest)."""
    if argv and argv[0] not in COMMAND_WORDS and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def cmd_ctl(args: argparse.Namespace) -> int:
    from ..control.client import ControlClient, resolve_control_path

    argv = list(args.argv)
    if args.ctl_json:
        argv.append("--json")
    parser = build_ctl_parser()
    if args.ctl_help or argv in (["-h"], ["--help"]):
        parser.print_help()
        return 0
    if not argv:
        raise UsageError("give a COMMAND, like status (see `buselab ctl --help`)")
    target, rest = _split_target(argv)
    if rest == ["help"]:
        parser.print_help()
        return 0
    if not rest:
        if target is not None and not _looks_like_socket(target):
            raise UsageError(
                f"unknown command {target!r}: choose one of {', '.join(sorted(COMMAND_WORDS - {'continue'}))}"
                " (see `buselab ctl --help`)"
            )
        raise UsageError(f"give a COMMAND after the socket {target}, like status (see `buselab ctl --help`)")
    opts = parser.parse_args(rest)
    cmd, params = _request(opts)
    path = resolve_control_path(target)
    as_json = getattr(opts, "json", False)
    with ControlClient(path, timeout=getattr(opts, "socket_timeout", 600.0)) as client:
        reply = client.request(cmd, **params)
    # A refused command is a user error like any other: one line, exit 2 (README).
    if as_json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0 if reply.get("ok") else 2
    if not reply.get("ok"):
        print(f"buselab: error: {reply.get('error') or 'refused'}", file=sys.stderr)
        return 2
    print(render(cmd, reply.get("result")))
    return 0


def _looks_like_socket(target: str) -> bool:
    """A PATH or PID given before the command (as opposed to a mistyped command word)."""
    return target.isdigit() or "/" in target or target.endswith(".ctl") or os.path.exists(target)


def _request(opts: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    command = opts.command
    if command in ("resume", "continue"):
        return "resume", {}
    if command == "step":
        params: dict[str, Any] = {"wait": opts.wait}
        if opts.fail:
            params["fail"] = opts.fail
        if opts.delay is not None:
            params["delay"] = opts.delay
        return "step", params
    if command == "wait":
        return "wait", {"count": opts.count, "timeout": opts.wait_timeout}
    if command == "break":
        action = {"ls": "list", "remove": "rm"}.get(opts.action, opts.action)
        if action == "add":
            return "break.add", {"spec": ",".join(opts.spec)}
        if action == "list":
            return "break.list", {}
        return f"break.{action}", {"ref": opts.ref}
    if command == "filter":
        action = {"ls": "list", "remove": "rm"}.get(opts.action, opts.action)
        if action == "add":
            return "filter.add", {"spec": opts.spec, "position": opts.position}
        if action == "list":
            return "filter.list", {}
        return f"filter.{action}", {"ref": opts.ref}
    if command == "switch":
        params = {"kind": opts.kind, "path": opts.path, "size": opts.size, "copy": not opts.no_copy}
        if opts.overwrite:
            params["overwrite"] = True
        return "switch", params
    if command == "cow":
        return f"cow.{opts.action}", {}
    if command == "events":
        return "events", {"limit": opts.limit}
    return command, {}


# -- human output -------------------------------------------------------------------------


def _req(info: dict[str, Any]) -> str:
    flags = f" {'|'.join(info['flags'])}" if info.get("flags") else ""
    text = f"{info['op']} {info['offset']}+{info['length']}{flags}"
    if "conn" in info:
        text += f" (conn {info['conn']}, held {info.get('waited', 0):.1f} s"
        if info.get("breakpoint"):
            text += f", breakpoint {info['breakpoint']}"
        text += ")"
    return text


def _filters(filters: list[dict[str, Any]]) -> list[str]:
    lines = []
    for f in filters:
        stats = ", ".join(f"{k} {v}" for k, v in f.get("stats", {}).items() if not isinstance(v, dict))
        state = "on" if f["enabled"] else "off"
        lines.append(f"  {f['id']}: {f['spec']} [{state}]" + (f"  {stats}" if stats else ""))
    return lines


def _breakpoints(bps: list[dict[str, Any]]) -> list[str]:
    return [
        f"  {b['id']}: {b['spec']} [{'on' if b['enabled'] else 'off'}] {b['hits']} hit{'s' if b['hits'] != 1 else ''}"
        for b in bps
    ]


def _removed(what: str, ids: list[int]) -> str:
    if not ids:
        return f"no {what}s to remove"
    return f"removed {what}{'s' if len(ids) != 1 else ''} " + ", ".join(str(i) for i in ids)


def _activity(r: dict[str, Any]) -> list[str]:
    """In flight, latency and sequential share over the status window, for people."""
    window = f"last {r.get('window', 0):.0f} s"
    lines = [f"in flight: {r.get('in_flight', 0)} now, at most {r.get('max_in_flight', 0)} ({window})"]
    busy = [conn for conn in r.get("in_flight_by_connection") or [] if conn.get("max_in_flight")]
    if len(busy) > 1:
        lines[0] += "; by connection: " + ", ".join(
            f"{conn.get('peer') or conn.get('conn')} {conn['in_flight']} (max {conn['max_in_flight']})" for conn in busy
        )
    latency = r.get("latency") or {}
    if latency:
        lines.append(f"latency in buselab ({window}):")
        for op, lat in latency.items():
            seq = (r.get("sequential") or {}).get(op) or {}
            share = seq.get("share")
            pattern = f", {share:.0%} sequential" if share is not None else ""
            lines.append(
                f"  {op:<12} p50 {latency_text(lat['p50_ms'] / 1e3)}, p99 {latency_text(lat['p99_ms'] / 1e3)}"
                f" ({lat['requests']:,} requests{pattern})"
            )
    return lines


def render(cmd: str, result: Any) -> str:
    """One line (or a short block for lists and status) for people."""
    if cmd == "status":
        r = result
        state = "PAUSED" if r["paused"] else "running"
        if r.get("powered_off"):
            state = "POWER OFF (every request fails with EIO until poweron)"
        if r["held"]:
            state += f", {len(r['held'])} held, oldest {r['oldest_wait']:.1f} s"
        lines = [
            f"backend: {r['backend']}, {human_bytes(r['size'])}" + (f" on {r['where']}" if r.get("where") else ""),
            f"state: {state}; {r['connections']} client(s), {r['requests']} requests",
        ]
        lines += _activity(r)
        if r.get("cow_changed_bytes") is not None:
            lines.append(f"cow: {human_bytes(r['cow_changed_bytes'])} changed")
        if r["held"]:
            lines.append("held (oldest first):")
            lines += [f"  {_req(h)}" for h in r["held"]]
        lines.append("filters (lowest first):" if r["filters"] else "filters: none")
        lines += _filters(r["filters"])
        lines.append("breakpoints:" if r["breakpoints"] else "breakpoints: none")
        lines += _breakpoints(r["breakpoints"])
        if r.get("last_break"):
            lines.append(f"last breakpoint hit: {_req(r['last_break'])} (breakpoint {r['last_break']['breakpoint']})")
        if r.get("control"):
            lines.append(f"control: {r['control']}")
        return "\n".join(lines)
    if cmd == "stop":
        return "stopping: buselab answers what is in flight, then ends"
    if cmd == "pause":
        return f"paused ({result['held']} held)"
    if cmd == "resume":
        n = result["released"]
        return f"resumed: released {n} held request{'s' if n != 1 else ''}"
    if cmd == "step":
        how = {"fail": f", failed with {result.get('errno')}", "delay": f", {result.get('delay_ms', 0):g} ms late"}
        return f"stepped {_req(result)}{how.get(result['action'], '')}; {result['still_held']} still held"
    if cmd in ("held", "wait"):
        if not result:
            return "nothing held"
        return "\n".join(_req(h) for h in result)
    if cmd == "break.add":
        return "added breakpoint " + "\n".join(_breakpoints([result])).strip()
    if cmd.startswith("break.") and isinstance(result, dict) and "spec" in result:
        return "now breakpoint " + "\n".join(_breakpoints([result])).strip()
    if cmd == "break.list":
        return "\n".join(_breakpoints(result)) if result else "no breakpoints"
    if cmd == "break.rm":
        return _removed("breakpoint", result["removed"])
    if cmd == "filter.rm" and "removed" in result:
        return _removed("filter", result["removed"])
    if cmd == "filter.list":
        return "\n".join(_filters(result)) if result else "no filters"
    if cmd.startswith("filter."):
        verb = {"filter.add": "added", "filter.rm": "removed"}.get(cmd, "now")
        return f"{verb} filter {result['id']}: {result['spec']} [{'on' if result['enabled'] else 'off'}]"
    if cmd == "switch":
        copied = f"; copied {human_bytes(result['copied_bytes'])}" if result.get("copied_bytes") else ""
        took = f" in {result['seconds']:.2f} s" if result.get("seconds") else ""
        grew = ""
        if result.get("grew_from"):
            grew = (
                f"; the disk grew from {human_bytes(result['grew_from'])} to {human_bytes(result['size'])}"
                " (clients connected now, and a kernel device, keep the old size)"
            )
        return f"switched: {result['from']} -> {result['to']}{copied}{took}{grew}"
    if cmd == "powercut":
        n = result.get("lost_writes", 0)
        seqs = result.get("lost_requests") or []
        which = ""
        if seqs:
            shown = ", ".join(str(seq) for seq in seqs[:10]) + (", ..." if len(seqs) > 10 else "")
            which = f": request{'s' if len(seqs) != 1 else ''} {shown}"
        return (
            f"power cut: {human_bytes(result['lost_bytes'])} of writes since the last FLUSH lost "
            f"({n} write{'s' if n != 1 else ''}{which}); every request fails with EIO until `buselab ctl poweron`"
        )
    if cmd == "poweron":
        n = result["refused"]
        return f"power on after {result['off_seconds']:.1f} s off ({n} request{'s' if n != 1 else ''} failed meanwhile)"
    if cmd == "cow.commit":
        return f"committed {human_bytes(result['committed_bytes'])} of changes into the base"
    if cmd == "cow.discard":
        return f"discarded {human_bytes(result['discarded_bytes'])} of changes"
    if cmd == "events":
        return "\n".join(f"{time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['message']}" for e in result)
    return json.dumps(result, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - for `python -m buselab.commands.ctl`
    parser = ArgumentParser(prog="buselab")
    register(parser.add_subparsers())
    try:
        args = parser.parse_args(["ctl", *(sys.argv[1:] if argv is None else argv)])
        return cmd_ctl(args)
    except UserError as exc:
        print(f"buselab: error: {exc}", file=sys.stderr)
        return 2
