"""The `buselab` command line.

    buselab ram [--size SIZE] [DEVICE]
    buselab file PATH [--size SIZE] [DEVICE]       (alias: lo)
    buselab null --size SIZE [DEVICE]
    buselab plugin FILE[:CLASS] [DEVICE]
    buselab demo
    buselab man | completion bash|zsh

Without DEVICE the disk is served over NBD (TCP 127.0.0.1:10809 unless
--listen/--unix say otherwise, or sockets are handed down by systemd or libnbd,
or --run serves on a private Unix socket). Every error a user can cause ends in
one line. More subcommands live in buselab/commands/ and register themselves.
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
from .activation import inherited_sockets
from .captive import Captive
from .commands import ArgumentParser, UsageError, help_command
from .control import default_control_path
from .daemon import exit_with_parent, fork_until_serving, pidfile, serve_quietly
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
        # Kernel-only: None when not given, so that giving one without a device is refused.
        p.add_argument(
            "--connections", type=int, metavar="N", help="kernel: N sockets (queues) for the device (default 1)"
        )
        p.add_argument(
            "--ioctl", action="store_true", default=None, help="kernel: attach with ioctls (BUSE's way), not netlink"
        )
        p.add_argument(
            "--timeout",
            type=int,
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
    p.add_argument(
        "--run",
        metavar="CMD",
        help="captive mode (as nbdkit's): serve, run CMD with $uri, $unixsocket, $port, $exportname, $nbd, $dev set,"
        " stop when it exits and exit with its status",
    )
    p.add_argument("--pidfile", metavar="FILE", help="write the serving process's PID here once serving")
    p.add_argument("--fork", action="store_true", help="go to the background once serving (as qemu-nbd --fork)")
    p.add_argument("--exit-with-parent", action="store_true", help="stop cleanly when the parent process exits")
    p.add_argument("--seconds", type=positive_seconds, help=argparse.SUPPRESS)  # stop after N seconds (tests, demos)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="buselab", description="A block device in userspace with a live lab around it.")
    parser.add_argument("--version", action="version", version=f"buselab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    # Not required: bare `buselab` prints the help (see _main).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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

    p = sub.add_parser("man", help="print the manual page (roff): buselab man > buselab.1; man -l buselab.1")
    p.set_defaults(func=cmd_man)
    p = sub.add_parser("completion", help="print a completion script: source <(buselab completion bash)")
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")
    p.set_defaults(func=cmd_completion)
    return parser


def _command_modules() -> list:
    """Subcommands that live in buselab/commands/ (ctl, replay, stats, ...)."""
    from . import commands

    return [importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]


KERNEL_ONLY = ("connections", "timeout", "ioctl")


def serve_options(args: argparse.Namespace, sockets: list | None = None) -> ServeOptions:
    """ServeOptions from the arguments; `sockets` are listeners handed down (socket activation)."""
    listen = [parse_listen(text) for text in args.listen or []]
    unix = list(args.unix or [])
    sockets = sockets or []
    device = getattr(args, "device", None) or getattr(args, "device_option", None)
    given = [f"--{name}" for name in KERNEL_ONLY if getattr(args, name, None) is not None]
    if given and not device:
        # Silently ignored they would look like they worked: a --timeout that never fires.
        them = "them" if len(given) > 1 else "it"
        raise UserError(f"{', '.join(given)}: only for a kernel device; give DEVICE (e.g. /dev/nbd0) or drop {them}")
    if (getattr(args, "connections", None) or 1) < 1:
        raise UserError("--connections must be at least 1")
    if not listen and not unix and not device and not sockets and not getattr(args, "run", None):
        listen = [("127.0.0.1", DEFAULT_PORT)]  # --run without these serves on a private socket (cmd_serve)
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
        connections=getattr(args, "connections", None) or 1,
        use_ioctl=bool(getattr(args, "ioctl", False)),
        timeout=getattr(args, "timeout", None) or 0,
        unix_mode=getattr(args, "unix_mode", DEFAULT_UNIX_MODE),
        handshake_limit=getattr(args, "handshake_limit", DEFAULT_HANDSHAKE_LIMIT),
        sockets=sockets,
    )


def run_session(
    session: Session, args: argparse.Namespace, *, serving=None, parent: int | None = None, for_others: bool = False
) -> int:
    """Start the session and run the lab, or headless if asked or no lab exists.

    `serving` is called once the disk is served (--fork's parent then returns); `parent`
    is the pid --exit-with-parent watches; `for_others` says stdout is not ours (--run,
    socket activation, --fork): no stats lines there, and the lab only for --run on a terminal.
    """
    with stop_on_signals(session.stop_requested):
        if getattr(args, "exit_with_parent", False) and parent is not None:
            exit_with_parent(session.stop_requested, parent)
        session.start()
        captive = None
        try:
            with pidfile(getattr(args, "pidfile", None)):
                if serving is not None:
                    serving()
                command = getattr(args, "run", None)
                lab = not args.headless and _lab_possible() and (command is not None or not for_others)
                if command is not None:
                    captive = Captive(command, session, lab=lab)
                    captive.start()
                if for_others and not lab:
                    code = _run_for_others(session, args)
                else:
                    code = _run_frontend(session, args)
        finally:
            session.stop()  # idempotent; here for a --pidfile that could not be written
            if captive is not None:
                code = captive.finish()
        return code


def _lab_possible() -> bool:
    """Would the lab open: a terminal on both ends?"""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _run_for_others(session: Session, args: argparse.Namespace) -> int:
    """Serving for a --run command, a socket activator or as a daemon: stdout is theirs."""
    if args.headless:
        from .headless import run_headless

        return run_headless(session, out=sys.stderr, seconds=args.seconds)
    return serve_quietly(session, seconds=args.seconds)


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
    parent = os.getppid()  # as early as can be: --exit-with-parent's parent is this one
    if args.fork and args.run:
        raise UserError("--fork and --run do not go together: --run already waits for its command")
    if args.fork and args.exit_with_parent:
        raise UserError("--fork and --exit-with-parent do not go together: the parent exits once serving")
    # Before the fork: LISTEN_PID names this process.
    sockets = [found.sock for found in inherited_sockets()]
    options = serve_options(args, sockets)
    serving = fork_until_serving() if args.fork else None  # before any thread starts
    if serving is not None and not args.control:
        options.control = default_control_path()  # the child's pid: the one --pidfile gives and ctl PID finds
    size = parse_size(args.size) if args.size else None
    backend = open_backend(args.backend, size=size, path=getattr(args, "path", None), readonly=args.readonly)
    session = Session(backend, options)
    if args.run and not (options.listen or options.unix or options.sockets or options.device):
        options.unix.append(session.private_socket())  # as nbdkit: a socket only the command is told of
    for_others = bool(args.run or sockets or args.fork)
    return run_session(session, args, serving=serving, parent=parent, for_others=for_others)


def _grafts() -> dict[str, argparse.ArgumentParser]:
    """Subcommands that parse the rest of their line with a parser of their own (ctl's [PATH|PID] first)."""
    from .commands.ctl import build_ctl_parser

    return {"ctl": build_ctl_parser()}


def cmd_man(args: argparse.Namespace) -> int:
    from .manpage import manpage

    sys.stdout.write(manpage(build_parser(), grafts=_grafts()))
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import completion_script

    sys.stdout.write(completion_script(build_parser(), args.shell, grafts=_grafts()))
    return 0


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
    if args.command is None:
        # As git: asked for nothing, show what there is (on stdout, it is what was wanted),
        # but exit 1 (not 0) so that a script that lost its subcommand does not pass.
        parser.print_help()
        return 1
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
