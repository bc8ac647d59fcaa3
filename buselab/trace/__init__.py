"""Traces: record what a workload asked of a disk, replay it elsewhere, summarize it.

- `format`: the versioned JSON Lines format (docs/TRACE_FORMAT.md), reader and writer;
- `recorder`: `TraceRecorder.start(engine, path)` / `.stop()`, off the serve path;
- `replay`: `Replayer(engine, path).run()` compares every read with the trace;
- `stats`: `summarize(records, size=...)` -> dict, `format_text(dict)`.
"""

from .format import FORMAT_VERSION, TraceHeader, TraceRecord, open_trace

__all__ = ["FORMAT_VERSION", "TraceHeader", "TraceRecord", "open_trace"]
