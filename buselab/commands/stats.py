"""`buselab stats TRACE [--json]`: what a recorded run asked of the disk."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stats",
        help="summarize a trace: ops, bytes, sizes, alignment, latency percentiles, hot ranges, structures",
        description="Summarize a trace recorded with --record: ops, bytes, request-size and alignment"
        " histograms, latency percentiles per op, sequential vs random share, the most-touched ranges,"
        " and requests, bytes and latency per kind of structure (superblock, journal, inode table, ...).",
    )
    p.add_argument("trace", metavar="TRACE", help="a trace file (.jsonl, .jsonl.gz, .jsonl.zst)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--top", type=int, default=10, metavar="N", help="how many hot ranges to list (default 10)")
    p.add_argument("--partial", action="store_true", help="accept a trace that was cut short (no end line)")
    p.add_argument(
        "--image",
        metavar="FILE",
        help="label the requests from this disk image's map (e.g. the disk as the run left it)"
        " instead of the labels the trace carries",
    )
    p.set_defaults(func=cmd_stats)


def cmd_stats(args: argparse.Namespace) -> int:
    from ..trace.stats import format_text, summarize_trace, to_json

    summary = summarize_trace(args.trace, partial=args.partial, top=max(0, args.top), image=args.image)
    text = to_json(summary) if args.json else format_text(summary)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `buselab stats T | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
