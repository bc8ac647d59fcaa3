"""The summary a user wants after a run: what was asked of the disk, and how fast.

`summarize(records, size=...)` works on trace records and on the telemetry's
own `RequestRecord`s alike (anything with cmd, offset, length, latency, error
and t or time), so the lab can export the same JSON for a live session.

Definitions (docs/TRACE_FORMAT.md repeats them):
- request sizes: histogram per op of `length`, bucketed by the next power of
  two at or above it ("4096" holds 2049..4096 bytes);
- alignment: for data ops (READ, WRITE, TRIM, WRITE_ZEROES, CACHE), the
  largest power of two dividing the offset, capped at 1 MiB (offset 0 counts
  as 1 MiB); "unaligned" means not a multiple of 512;
- sequential: a data request whose offset is where one of the 32 data
  requests before it ended (so interleaved streams from several jobs or a
  queue depth above one still count as sequential); the others are random;
- latency percentiles: nearest rank over the recorded latencies, per op
  (exact: every latency is kept); the text shows them in µs below a
  millisecond, the JSON in seconds;
- hot ranges: the device cut into regions (a power of two, at least 4 KiB,
  about 1/1024 of the device), ranked by how many requests touched each;
- structures: for a labelled trace (or one labelled from a disk image), per
  kind of structure the data requests touched (buselab.fsmap.KINDS: the
  record's "struct"; a data request without one is "unknown"): requests,
  bytes, share of the data bytes, p50/p99 latency (exact), and the same per op.
"""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import UserError
from ..protocol import constants as c
from ..sizes import human_bytes, latency_text

DATA_CMDS = frozenset((c.CMD_READ, c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES, c.CMD_CACHE))
PERCENTILES = (50, 90, 99, 99.9)
SEQUENTIAL_WINDOW = 32
MAX_ALIGN = 1 << 20
MAX_REGION_SPAN = 1 << 16  # a request touching more regions than this counts in its first and last only
_HEAT_OF = {c.CMD_READ: 0, c.CMD_WRITE: 1, c.CMD_WRITE_ZEROES: 1, c.CMD_TRIM: 2}


def region_size_for(size: int | None) -> int:
    """A power of two >= 4 KiB giving about 1024 regions."""
    if not size:
        return 1 << 20
    target = max(4096, -(-size // 1024))
    return 1 << (target - 1).bit_length()


def size_bucket(length: int) -> int:
    """The power of two at or above `length` (0 stays 0)."""
    return 0 if length <= 0 else 1 << (length - 1).bit_length()


def alignment_of(offset: int) -> int:
    """Largest power of two dividing offset, capped at MAX_ALIGN; 0 if not a multiple of 512."""
    if offset == 0:
        return MAX_ALIGN
    align = offset & -offset
    if align < 512:
        return 0
    return min(align, MAX_ALIGN)


def _share(part: int, total: int) -> str:
    """part of total in percent: 100% and 0% only when it is all or nothing (not 99.88%)."""
    if part == total or not part:
        return "100%" if part else "0%"
    pct = 100 * part / total
    if pct >= 99.5:
        return f"{min(pct, 99.9):.1f}%"
    if pct < 0.5:
        return f"{max(pct, 0.1):.1f}%"
    return f"{pct:.0f}%"


def _percentile(sorted_values: array, q: float) -> float:
    n = len(sorted_values)
    if not n:
        return 0.0
    rank = max(1, math.ceil(q / 100 * n))
    return sorted_values[rank - 1]


def _op_name(cmd: int) -> str:
    return c.CMD_NAMES.get(cmd, f"CMD{cmd}")


class StatsAccumulator:
    """Feed records one by one (`add`), then take `result()`; streams big traces."""

    def __init__(
        self,
        size: int | None = None,
        *,
        top: int = 10,
        region_size: int | None = None,
        labelled: bool = False,
        struct_of: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.size = size
        # The records say what they touched (a trace's "struct", or `struct_of(record)`, as the
        # lab's labeller knows it for telemetry records): break them down by structure.
        self.labelled = labelled or struct_of is not None
        self.struct_of = struct_of
        # kind -> op -> [requests, bytes, latencies]
        self.structures: dict[str, dict[int, list]] = {}
        self.top = top
        self.region = region_size or region_size_for(size)
        self.count: dict[int, int] = {}
        self.bytes: dict[int, int] = {}
        self.errors: dict[int, int] = {}
        self.latencies: dict[int, array] = {}
        self.sizes: dict[int, dict[int, int]] = {}
        self.sequential: dict[int, int] = {}
        self.alignment: dict[int, int] = {}
        self.aligned_4k = 0
        self.data_requests = 0
        self.regions: dict[int, list[int]] = {}  # region index -> [reads, writes, trims, bytes]
        self._recent_ends: dict[int, None] = {}
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.last_end_time: float | None = None

    def add(self, r: Any) -> None:
        cmd = r.cmd
        offset = r.offset
        length = r.length
        latency = r.latency
        t = getattr(r, "t", None)
        if t is None:
            t = r.time
        if self.first_time is None or t < self.first_time:
            self.first_time = t
        if self.last_time is None or t > self.last_time:
            self.last_time = t
        end_time = t + latency
        if self.last_end_time is None or end_time > self.last_end_time:
            self.last_end_time = end_time
        self.count[cmd] = self.count.get(cmd, 0) + 1
        lat = self.latencies.get(cmd)
        if lat is None:
            lat = self.latencies[cmd] = array("d")
        lat.append(latency)
        if r.error:
            self.errors[cmd] = self.errors.get(cmd, 0) + 1
            return
        self.bytes[cmd] = self.bytes.get(cmd, 0) + length
        if cmd not in DATA_CMDS:
            return
        self.data_requests += 1
        if self.labelled:
            kind = self.struct_of(r) if self.struct_of is not None else getattr(r, "struct", None)
            self._add_structure(kind or "unknown", cmd, length, latency)
        hist = self.sizes.get(cmd)
        if hist is None:
            hist = self.sizes[cmd] = {}
        bucket = size_bucket(length)
        hist[bucket] = hist.get(bucket, 0) + 1
        align = alignment_of(offset)
        self.alignment[align] = self.alignment.get(align, 0) + 1
        if offset % 4096 == 0 and length % 4096 == 0:
            self.aligned_4k += 1
        recent = self._recent_ends
        if offset in recent:
            self.sequential[cmd] = self.sequential.get(cmd, 0) + 1
            del recent[offset]
        end = offset + length
        recent.pop(end, None)
        recent[end] = None
        if len(recent) > SEQUENTIAL_WINDOW:
            del recent[next(iter(recent))]
        if length:
            kind = _HEAT_OF.get(cmd)
            first = offset // self.region
            last = (end - 1) // self.region
            span = range(first, last + 1) if last - first < MAX_REGION_SPAN else (first, last)
            regions = self.regions
            for i in span:
                cell = regions.get(i)
                if cell is None:
                    cell = regions[i] = [0, 0, 0, 0]
                if kind is not None:
                    cell[kind] += 1
                lo = max(offset, i * self.region)
                hi = min(end, (i + 1) * self.region)
                cell[3] += hi - lo

    def _add_structure(self, kind: str, cmd: int, length: int, latency: float) -> None:
        by_op = self.structures.get(kind)
        if by_op is None:
            by_op = self.structures[kind] = {}
        entry = by_op.get(cmd)
        if entry is None:
            entry = by_op[cmd] = [0, 0, array("d")]
        entry[0] += 1
        entry[1] += length
        entry[2].append(latency)

    def structures_result(self) -> dict[str, Any] | None:
        """Per kind: requests, bytes, share of the data bytes, p50/p99 and `ops`; None unlabelled."""
        if not self.labelled:
            return None
        total_bytes = sum(e[1] for by_op in self.structures.values() for e in by_op.values())
        out: dict[str, Any] = {}

        def entry_of(requests: int, nbytes: int, lat: array) -> dict[str, Any]:
            ordered = array("d", sorted(lat))
            return {
                "requests": requests,
                "bytes": nbytes,
                "share": nbytes / total_bytes if total_bytes else 0.0,
                "p50": _percentile(ordered, 50),
                "p99": _percentile(ordered, 99),
            }

        ranked = sorted(self.structures.items(), key=lambda kv: -sum(e[1] for e in kv[1].values()))
        for kind, by_op in ranked:
            every = array("d")
            for e in by_op.values():
                every.extend(e[2])
            kind_entry = entry_of(sum(e[0] for e in by_op.values()), sum(e[1] for e in by_op.values()), every)
            kind_entry["ops"] = {_op_name(cmd): entry_of(*by_op[cmd]) for cmd in sorted(by_op)}
            out[kind] = kind_entry
        return out

    def result(self) -> dict[str, Any]:
        ops: dict[str, Any] = {}
        total = sum(self.count.values())
        for cmd in sorted(self.count):
            lat = array("d", sorted(self.latencies.get(cmd, ())))
            entry: dict[str, Any] = {
                "count": self.count[cmd],
                "bytes": self.bytes.get(cmd, 0),
                "errors": self.errors.get(cmd, 0),
                "latency": {
                    "mean": (sum(lat) / len(lat)) if lat else 0.0,
                    **{f"p{q:g}": _percentile(lat, q) for q in PERCENTILES},
                    "max": lat[-1] if lat else 0.0,
                },
            }
            if cmd in DATA_CMDS:
                ok = self.count[cmd] - self.errors.get(cmd, 0)
                seq = self.sequential.get(cmd, 0)
                entry["sequential"] = seq
                entry["random"] = ok - seq
                entry["sizes"] = {str(k): v for k, v in sorted(self.sizes.get(cmd, {}).items())}
            ops[_op_name(cmd)] = entry
        seq_total = sum(self.sequential.values())
        duration = 0.0
        if self.first_time is not None and self.last_end_time is not None:
            duration = max(0.0, self.last_end_time - self.first_time)
        region = self.region
        ranked = sorted(self.regions.items(), key=lambda kv: (-(kv[1][0] + kv[1][1] + kv[1][2]), kv[0]))
        hot = [
            {
                "offset": i * region,
                "length": region,
                "touches": cell[0] + cell[1] + cell[2],
                "reads": cell[0],
                "writes": cell[1],
                "trims": cell[2],
                "bytes": cell[3],
            }
            for i, cell in ranked[: self.top]
        ]
        alignment = {("unaligned" if k == 0 else str(k)): v for k, v in sorted(self.alignment.items())}
        return {
            "requests": total,
            "errors": sum(self.errors.values()),
            "duration": duration,
            "iops": total / duration if duration > 0 else 0.0,
            "device_size": self.size,
            "bytes_read": self.bytes.get(c.CMD_READ, 0),
            "bytes_written": self.bytes.get(c.CMD_WRITE, 0),
            "ops": ops,
            "alignment": alignment,
            "aligned_4k": self.aligned_4k,
            "sequential": {
                "sequential": seq_total,
                "random": self.data_requests - seq_total,
                "share": seq_total / self.data_requests if self.data_requests else 0.0,
            },
            "region_size": region,
            "hot_ranges": hot,
            "structures": self.structures_result(),
        }


def summarize(
    records: Iterable[Any],
    *,
    size: int | None = None,
    top: int = 10,
    labelled: bool = False,
    struct_of: Callable[[Any], str | None] | None = None,
) -> dict[str, Any]:
    """Statistics of a run, as a JSON-ready dict (see the module docstring)."""
    acc = StatsAccumulator(size, top=top, labelled=labelled, struct_of=struct_of)
    for r in records:
        acc.add(r)
    return acc.result()


def summarize_trace(path: str, *, partial: bool = False, top: int = 10, image: str | None = None) -> dict[str, Any]:
    """`summarize` over a trace file, with what its header says about the device.

    With `image` (a disk image, e.g. the disk as it was left), requests are labelled from that
    image's map instead of what the trace says (one map: the structures where the image has them).
    """
    from .format import open_trace

    relabel = _image_labeller(image) if image is not None else None
    with open_trace(path, partial=partial) as reader:
        header = reader.header
        records: Iterable[Any] = reader if relabel is None else map(relabel, reader)
        result = summarize(records, size=header.size, top=top, labelled=header.labels or relabel is not None)
        result["trace"] = {
            "path": path,
            "backend": header.backend,
            "description": header.description,
            "created": header.created,
            "payload": header.payload,
            "truncated": reader.truncated,
            "labels": "image" if relabel is not None else "trace" if header.labels else None,
        }
        if image is not None:
            result["trace"]["image"] = image
    return result


def _image_labeller(image: str) -> Any:
    """A function that gives a trace record the label the image's map has for it."""
    import os

    from ..fsmap import build_map

    try:
        fd = os.open(image, os.O_RDONLY)
    except OSError as exc:
        raise UserError(f"cannot read image {image}: {exc.strerror or exc}") from exc
    try:
        size = os.lseek(fd, 0, os.SEEK_END)

        def read(offset: int, length: int) -> bytes:
            data = os.pread(fd, length, offset)
            return data + bytes(length - len(data))  # past the end of a short image: zeros

        try:
            fsmap = build_map(read, size)
        except OSError as exc:
            raise UserError(f"cannot read image {image}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if not (fsmap.filesystems or fsmap.table):
        raise UserError(f"image {image} holds no partition table or file system that buselab knows")

    def relabel(record: Any) -> Any:
        if record.cmd not in DATA_CMDS:
            return record
        label = fsmap.label(record.offset, record.length, record.data)
        return record._replace(struct=label.kind, label=str(label))

    return relabel


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)


# -- text ------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    """A latency for the table: in ms to the microsecond, in µs below a millisecond (not "0.005 ms")."""
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else latency_text(seconds)


def _size_label(n: int) -> str:
    for unit, shift in (("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _percent(share: float) -> str:
    if share <= 0:
        return "0%"
    if share >= 0.995 and share < 1:
        return f"{min(share * 100, 99.9):.1f}%"
    return f"{share:.0%}" if share >= 0.005 else f"{max(share * 100, 0.1):.1f}%"


def _bar(n: int, most: int, width: int = 30) -> str:
    return "#" * max(1, round(width * n / most)) if most and n else ""


def format_text(s: dict[str, Any]) -> str:
    out: list[str] = []
    trace = s.get("trace")
    if trace:
        desc = trace.get("description") or trace.get("backend") or "?"
        out.append(f"trace {trace['path']}: recorded on {desc}, {trace.get('created') or 'unknown date'}")
        if trace.get("truncated"):
            out.append("  (cut short: no end line; these are the complete records it holds)")
    size = s.get("device_size")
    out.append(
        f"{s['requests']:,} requests over {s['duration']:.3f} s ({s['iops']:,.0f} req/s)"
        + (f" on a {human_bytes(size)} device" if size else "")
        + f"; read {human_bytes(s['bytes_read'])}, wrote {human_bytes(s['bytes_written'])}; errors {s['errors']:,}"
    )
    out.append("")
    out.append(
        f"{'op':<13}{'count':>10}{'bytes':>12}{'errors':>8}{'p50':>12}{'p90':>12}{'p99':>12}{'p99.9':>12}{'max':>12}"
    )
    for name, op in s["ops"].items():
        lat = op["latency"]
        out.append(
            f"{name:<13}{op['count']:>10,}{human_bytes(op['bytes']):>12}{op['errors']:>8,}"
            f"{_ms(lat['p50']):>12}{_ms(lat['p90']):>12}{_ms(lat['p99']):>12}{_ms(lat['p99.9']):>12}{_ms(lat['max']):>12}"
        )
    seq = s["sequential"]
    total = seq["sequential"] + seq["random"]
    if total:
        out.append("")
        out.append(
            f"sequential {seq['sequential']:,} ({_share(seq['sequential'], total)}),"
            f" random {seq['random']:,} ({_share(seq['random'], total)})"
            f" of {total:,} data requests; 4K-aligned (offset and length) {_share(s['aligned_4k'], total)}"
        )
    for name, op in s["ops"].items():
        sizes = op.get("sizes")
        if not sizes:
            continue
        out.append("")
        out.append(f"{name} sizes (up to)")
        most = max(sizes.values())
        for k, v in sizes.items():
            out.append(f"  {_size_label(int(k)):>8} {v:>10,} {_bar(v, most)}")
    if s["alignment"]:
        out.append("")
        out.append("offset alignment (largest power of two dividing it)")
        most = max(s["alignment"].values())
        for k, v in s["alignment"].items():
            label = k if k == "unaligned" else _size_label(int(k)) + ("+" if int(k) == MAX_ALIGN else "")
            out.append(f"  {label:>9} {v:>10,} {_bar(v, most)}")
    structures = s.get("structures")
    out.append("")
    if structures is None:
        out.append(
            "by structure: this trace has no labels (recorded without the disk's map, or by an older buselab);"
            " --image FILE labels it from a disk image"
        )
    elif structures:
        source = " (labelled from the image)" if (trace or {}).get("labels") == "image" else ""
        out.append(f"by structure{source}")
        out.append(f"  {'structure':<16}{'op':<14}{'requests':>10}{'bytes':>12}{'share':>8}{'p50':>12}{'p99':>12}")
        for kind, entry in structures.items():
            rows = [("all", entry)] if len(entry["ops"]) > 1 else []
            rows += list(entry["ops"].items())
            for i, (op, row) in enumerate(rows):
                out.append(
                    f"  {kind if i == 0 else '':<16}{op:<14}{row['requests']:>10,}{human_bytes(row['bytes']):>12}"
                    f"{_percent(row['share']):>8}"
                    f"{_ms(row['p50']):>12}{_ms(row['p99']):>12}"
                )
    else:
        out.append("by structure: no data requests")
    if s["hot_ranges"]:
        out.append("")
        out.append(f"most-touched ranges ({human_bytes(s['region_size'])} regions)")
        for h in s["hot_ranges"]:
            out.append(
                f"  {h['offset']:>14,} +{human_bytes(h['length']):>10}  {h['touches']:>8,} touches"
                f" (r {h['reads']:,} w {h['writes']:,} t {h['trims']:,}), {human_bytes(h['bytes'])}"
            )
    return "\n".join(out)
