"""`buselab replay TRACE --backend SPEC`: play a recorded workload on a backend and compare.

Exit status: 0 when every result and every read matched the trace, 1 at the
first divergence or more (the summary names the first), 2 for a bad trace or
backend (one line), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from ..errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay",
        help="play a trace against a backend and compare every read",
        description="Replay a trace recorded with --record against a backend, comparing every read's data"
        " and every request's result with the trace. Backends: ram[:SIZE] (default: a fresh RAM disk as big"
        " as the traced device), file:PATH (made at the trace's size if missing), null[:SIZE],"
        " plugin:FILE[:CLASS].",
        epilog="Exit status: 0 everything matched, 1 a divergence (the first is described), 2 a bad trace or"
        " backend, 130 interrupted. The trace format: docs/TRACE_FORMAT.md.",
    )
    p.add_argument("trace", metavar="TRACE", help="a trace file (.jsonl, .jsonl.gz, .jsonl.zst)")
    p.add_argument(
        "--backend", default="ram", metavar="SPEC", help="ram[:SIZE], file:PATH, null[:SIZE], plugin:FILE[:CLASS]"
    )
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed", type=float, default=1.0, metavar="N", help="play at N times the recorded pace (default 1)"
    )
    pace.add_argument(
        "--as-fast-as-possible", "--afap", action="store_true", dest="fast", help="no pacing: each request at once"
    )
    p.add_argument(
        "--synthetic-writes",
        action="store_true",
        help="replay writes recorded without payload using a pattern (reads are then not compared)",
    )
    p.add_argument("--partial", action="store_true", help="accept a trace that was cut short (no end line)")
    p.add_argument("--stop-on-divergence", action="store_true", help="stop at the first divergence")
    p.add_argument("--checksum", action="store_true", help="print a checksum of the whole device afterwards")
    p.add_argument(
        "--filter", action="append", metavar="SPEC", help="stack a filter over the backend, e.g. delay:read=5ms"
    )
    p.add_argument("--record", metavar="FILE", help="record the replay itself to a new trace")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--headless", action="store_true", help="no lab: print progress and a summary")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from ..session import ServeOptions, Session
    from ..trace.format import open_trace
    from ..trace.replay import Replayer, open_replay_backend

    if args.record and os.path.abspath(args.record) == os.path.abspath(args.trace):
        raise UserError("--record names the trace being replayed: record the replay to another file")
    with open_trace(args.trace, partial=args.partial) as reader:
        header = reader.header
    backend = open_replay_backend(args.backend, header.size)
    session = Session(backend, ServeOptions(filters=list(args.filter or []), record=args.record))
    progress_out = sys.stderr

    def progress(summary) -> None:
        if args.quiet:
            return
        total = summary.total
        of = f"/{total:,} ({summary.requests / total:.0%})" if total else ""
        print(
            f"replay: {summary.requests:,}{of} requests, {summary.divergences:,} divergences",
            file=progress_out,
            flush=True,
        )

    lab = None if args.headless or not sys.stdout.isatty() else _lab()
    try:
        session.start()
        replayer = Replayer(
            session.engine,
            args.trace,
            speed=None if args.fast else args.speed,
            synthetic_writes=args.synthetic_writes,
            partial=args.partial,
            stop_on_divergence=args.stop_on_divergence,
            checksum=args.checksum,
            progress=None if lab is not None else progress,  # lines on stderr would tear the lab's screen
        )
        session.replayer = replayer  # the lab shows its progress (see docs/TRACE_FORMAT.md)
        if not args.quiet:
            speed = "as fast as possible" if args.fast else f"at {args.speed:g}x the recorded pace"
            total = f"{replayer.total:,} requests" + (", cut short" if replayer.truncated else "")
            print(
                f"buselab: replaying {args.trace} ({total}, recorded on {header.description or header.backend or 'an unnamed backend'})"
                f" on {backend.describe()}, {speed}",
                file=progress_out,
                flush=True,
            )
        interrupted = False
        if lab is not None:
            # The lab stops the session when it quits; Session.stop stops the replay first.
            replayer.start()
            try:
                lab(session, seconds=None)
            finally:
                replayer.stop()
                replayer.join()
            if replayer.error is not None:
                raise replayer.error
            summary = replayer.summary
        else:
            try:
                # Ctrl-C / SIGINT stops the replay, also when started from a script's background
                # job (`cmd &` there ignores SIGINT, and Python then never raises KeyboardInterrupt).
                signal.signal(signal.SIGINT, signal.default_int_handler)
                summary = replayer.run()
            except KeyboardInterrupt:
                interrupted = True
                summary = replayer.summary
                summary.stopped = True
    finally:
        session.stop()
    text = json.dumps(summary.to_json(), indent=2) if args.json else "\n".join(summary.lines())
    try:
        print(text, flush=True)
    except BrokenPipeError:  # piped into `head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if interrupted:
        return 130
    return 0 if summary.ok else 1


def _lab():
    try:
        from ..ui.lab import run_lab
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("buselab.ui"):
            raise
        return None
    return run_lab
