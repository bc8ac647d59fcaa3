"""The `buselab` command line.

    buselab ram [--size SIZE] [DEVICE]
    buselab file PATH [--size SIZE] [DEVICE]       (alias: lo)
    buselab null --size SIZE [DEVICE]
    buselab plugin FILE[:CLASS] [DEVICE]
    buselab demo

Without DEVICE the disk is served over NBD (TCP 127.0.0.1:10809 unless
--listen/--unix say otherwise). Every error a user can cause ends in one line.
More subcommands live in buselab/commands/ and register themselves.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import pkgutil
import select
import signal
import sys
import threading

from . import __version__
from .commands import ArgumentParser, UsageError, help_command
from .control import default_control_path
from .errors import UserError
from .session import ServeOptions, Session
from .signals import stop_on_signals
from .sizes import parse_size
from .storage.registry import FilterSpecError, open_backend
from .transport.network import DEFAULT_HANDSHAKE_LIMIT, DEFAULT_PORT, DEFAULT_UNIX_MODE, parse_listen


def positive_seconds(text: str) -> float:
    """argparse type of --seconds: a number of seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def octal_mode(text: str) -> int:
    """argparse type of --unix-mode: permission bits in octal, like chmod's."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an octal mode such as 600 or 660, got {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"expected permission bits (000 to 777), got {text!r}")
    return value


def _add_serve_options(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    if device:
        p.add_argument(
            "device", nargs="?", metavar="DEVICE", help="/dev/nbdN to attach (needs root); omit to serve over NBD"
        )
        p.add_argument(
            "--device", dest="device_option", metavar="DEVICE", help="same as DEVICE; 'auto' picks a free /dev/nbdN"
        )
        p.add_argument(
            "--connections", type=int, default=1, metavar="N", help="kernel: N sockets (queues) for the device"
        )
        p.add_argument("--ioctl", action="store_true", help="kernel: attach with ioctls (BUSE's way), not netlink")
        p.add_argument(
            "--timeout",
            type=int,
            default=0,
            metavar="SECONDS",
            help="kernel: fail requests unanswered this long (default 0: wait forever, so pauses are safe)",
        )
    p.add_argument("--size", help="disk size, e.g. 512K, 128M, 1G, 1T")
    p.add_argument(
        "--listen", action="append", metavar="HOST:PORT", help=f"serve NBD over TCP (default 127.0.0.1:{DEFAULT_PORT})"
    )
    p.add_argument("--unix", action="append", metavar="PATH", help="serve NBD on a Unix socket")
    p.add_argument(
        "--unix-mode",
        type=octal_mode,
        default=DEFAULT_UNIX_MODE,
        metavar="MODE",
        help="permissions of the --unix sockets, e.g. 660 (default 600: whoever can connect can write the disk)",
    )
    p.add_argument(
        "--handshake-limit",
        type=positive_seconds,
        default=DEFAULT_HANDSHAKE_LIMIT,
        metavar="SECONDS",
        help=f"drop a client that has not finished the handshake by then (default {DEFAULT_HANDSHAKE_LIMIT:g})",
    )
    p.add_argument("--export-name", default="", help="the export's name (clients may also ask for '')")
    p.add_argument("--readonly", action="store_true", help="refuse writes with EPERM")
    p.add_argument("--headless", action="store_true", help="no lab: print one stats line a second")
    p.add_argument(
        "--filter", action="append", metavar="SPEC", help="stack a filter over the backend, e.g. delay:read=5ms"
    )
    p.add_argument("--control", metavar="PATH", help="control socket for `buselab ctl`")
    p.add_argument("--record", metavar="FILE", help="record every request to a trace (.jsonl, .gz, .zst)")
    p.add_argument(
        "--record-payload",
        choices=("none", "writes", "all"),
        default="writes",
        help="what the trace keeps of the data (default: writes, enough to replay)",
    )
    p.add_argument("--seconds", type=positive_seconds, help=argparse.SUPPRESS)  # stop after N seconds (tests, demos)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="buselab", description="A block device in userspace with a live lab around it.")
    parser.add_argument("--version", action="version", version=f"buselab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ram", help="a sparse RAM disk (128 MiB unless --size)")
    _add_serve_options(p)
    p.set_defaults(func=cmd_serve, backend="ram")

    for name in ("file", "lo"):
        p = sub.add_parser(
            name, help="a file or block device (BUSE's loopback)" + (" (alias of file)" if name == "lo" else "")
        )
        p.add_argument("path", metavar="PATH", help="file (created at --size if missing) or block device")
        _add_serve_options(p)
        p.set_defaults(func=cmd_serve, backend="file")

    p = sub.add_parser("null", help="reads zeros and discards writes (for benchmarks)")
    _add_serve_options(p)
    p.set_defaults(func=cmd_serve, backend="null")

    p = sub.add_parser("plugin", help="your own disk: a Python class with size, read, write")
    p.add_argument("path", metavar="FILE[:CLASS]", help="Python file, optionally :ClassName")
    _add_serve_options(p)
    p.set_defaults(func=cmd_serve, backend="plugin")

    p = sub.add_parser("nbd", help="another NBD server's export (nbdkit, qemu-nbd ...) with the lab in front")
    p.add_argument("path", metavar="URI", help="nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH")
    _add_serve_options(p)
    p.set_defaults(func=cmd_serve, backend="nbd")

    p = sub.add_parser("demo", help="the lab on a built-in RAM disk with a built-in workload (no root)")
    p.add_argument("--size", default="64M", help="demo disk size (default 64M)")
    p.add_argument("--headless", action="store_true", help="print stats instead of opening the lab")
    p.add_argument("--pace", type=float, default=0.002, help="seconds between demo requests")
    p.add_argument("--seconds", type=positive_seconds, help="stop after this many seconds")
    p.set_defaults(func=cmd_demo)

    for module in _command_modules():
        module.register(sub)
    return parser


def _command_modules() -> list:
    """Subcommands that live in buselab/commands/ (ctl, replay, stats, ...)."""
    from . import commands

    return [importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]


def serve_options(args: argparse.Namespace) -> ServeOptions:
    listen = [parse_listen(text) for text in args.listen or []]
    unix = list(args.unix or [])
    device = getattr(args, "device", None) or getattr(args, "device_option", None)
    if getattr(args, "connections", 1) < 1:
        raise UserError("--connections must be at least 1")
    if not listen and not unix and not device:
        listen = [("127.0.0.1", DEFAULT_PORT)]
    return ServeOptions(
        listen=listen,
        unix=unix,
        export_name=args.export_name,
        readonly=args.readonly,
        device=device,
        filters=list(args.filter or []),
        control=args.control or default_control_path(),
        record=args.record,
        record_payload=args.record_payload,
        connections=getattr(args, "connections", 1),
        use_ioctl=getattr(args, "ioctl", False),
        timeout=getattr(args, "timeout", 0),
        unix_mode=getattr(args, "unix_mode", DEFAULT_UNIX_MODE),
        handshake_limit=getattr(args, "handshake_limit", DEFAULT_HANDSHAKE_LIMIT),
    )


def run_session(session: Session, args: argparse.Namespace) -> int:
    """Start the session and run the lab, or headless if asked or no lab exists."""
    with stop_on_signals(session.stop_requested):
        session.start()
        return _run_frontend(session, args)


def _run_frontend(session: Session, args: argparse.Namespace) -> int:
    if not args.headless:
        try:
            from .ui.lab import run_lab
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("buselab.ui"):
                raise
        else:
            return run_lab(session, seconds=args.seconds)
    from .headless import run_headless

    return run_headless(session, seconds=args.seconds)


def cmd_serve(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size else None
    backend = open_backend(args.backend, size=size, path=getattr(args, "path", None), readonly=args.readonly)
    return run_session(Session(backend, serve_options(args)), args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .workload import DemoWorkload

    backend = open_backend("ram", size=parse_size(args.size))
    session = Session(backend, ServeOptions(control=default_control_path()))
    path = session.private_socket()
    session.options.unix.append(path)
    workload = DemoWorkload(path, pace=args.pace)
    session.demo_workload = workload  # the lab shows its progress
    with stop_on_signals(session.stop_requested):
        session.start()
        workload.start()
        try:
            return _run_frontend(session, args)
        finally:
            workload.stop()
            session.stop()


def main(argv: list[str] | None = None) -> int:
    # `kill -USR1 PID` prints every thread's stack to stderr: for a device that seems stuck,
    # it says whether buselab waits for the kernel or the kernel for buselab.
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe is a traceback
        return code
    except BrokenPipeError:
        if not stdout_is_gone():
            raise  # some other pipe or socket: a bug to see, not a reader that left
        silence_stdout()
        # `buselab ctl status | head -3`: the reader took what it wanted. The command
        # itself did its work, so this is success, not an error (as `buselab stats`).
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        # argparse stops filling positionals at the first option, so in
        # `file PATH --size 64M /dev/nbd3` the device would be "unrecognized".
        args, extra = parser.parse_known_args(argv)
        if extra:
            if getattr(args, "device", "absent") is None and len(extra) == 1 and not extra[0].startswith("-"):
                args.device = extra[0]
            else:
                raise UsageError(
                    f"unrecognized arguments: {' '.join(extra)} (see `{help_command('buselab ' + args.command)}`)"
                )
    except UsageError as exc:
        print(f"buselab: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="buselab: %(message)s")
    try:
        return args.func(args)
    except FilterSpecError as exc:  # a --filter given here (serving or replaying)
        print(f"buselab: error: {exc.worded('--filter')}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"buselab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def stdout_is_gone() -> bool:
    """Is stdout a pipe (or socket) whose reader has closed it?"""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return True  # no stdout left to ask


def silence_stdout() -> None:
    """Point stdout at /dev/null, so what is still buffered or printed later goes nowhere quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
