"""`buselab attach [PATH|PID]`: the lab on a buselab that is already running.

Found as `buselab ctl` finds one: a control socket PATH, a PID, or nothing when
you run exactly one. Over SSH, forward the socket (`ssh -L /tmp/b.sock:/remote.ctl
host`) and attach to the local end; see docs/ATTACH.md.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "attach",
        help="open the lab on a running buselab (q detaches; the device stays served)",
        description="Open the lab on a running buselab (started with --headless, say, or as a service):"
        " the stream, inspector, heatmap, graphs and every steering key, over its control socket."
        " q closes this viewer and leaves the device served; S stops the server (asks first)."
        " Several viewers may attach at once.",
    )
    p.add_argument(
        "target",
        nargs="?",
        metavar="PATH|PID",
        help="the control socket, or the pid of the buselab (default: the one buselab you run)",
    )
    p.add_argument("--hz", type=float, default=12.0, help="frames a second from the server (default 12)")
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)  # tests: close after this long
    p.set_defaults(func=cmd_attach)


def cmd_attach(args: argparse.Namespace) -> int:
    from ..control.client import resolve_control_path
    from ..ui.attached import run_attached
    from . import UsageError

    if not 0.5 <= args.hz <= 30:
        raise UsageError(f"--hz {args.hz:g}: give 0.5 to 30 frames a second (see `buselab attach --help`)")
    return run_attached(resolve_control_path(args.target), seconds=args.seconds, hz=args.hz)
