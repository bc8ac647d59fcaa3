"""The buselab trace format, version 1: JSON Lines, optionally compressed.

    line 1      header   {"format": "buselab-trace", "version": 1, "size": ..., ...}
    lines 2..   records  {"seq": 7, "t": 0.0123, "op": "READ", "offset": 0, "length": 4096, ...}
    last line   trailer  {"end": true, "records": N, ...}

A name ending in .gz is gzip, .zst is Zstandard, anything else is plain text.
docs/TRACE_FORMAT.md is the full description; this module is the one place
that writes and reads it, so the two must agree.

Reading is strict about what replay relies on (a line that is not JSON, a
missing field, a payload whose size disagrees with its length) and lenient
about the rest: unknown keys are ignored, so version 1 can grow fields.
"""

from __future__ import annotations

import binascii
import gzip
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, NamedTuple

from ..errors import UserError
from ..protocol import constants as c
from .codecs import b64decode, b64encode, crc32

FORMAT_NAME = "buselab-trace"
FORMAT_VERSION = 1
HASH_NAME = "crc32"  # the default: cheap enough to hash every request at 100k requests/s
HASHES = {"crc32": 8, "blake2b-128": 32}  # name -> hex digits
PAYLOAD_MODES = ("none", "writes", "all")
OPS = {name: cmd for cmd, name in c.CMD_NAMES.items() if cmd != c.CMD_DISC}
_READ_CHUNK = 1 << 20


def hasher(name: str) -> Callable[[bytes | bytearray | memoryview], str]:
    """The function that gives a trace's `hash` field for some data (hex)."""
    if name == "crc32":
        return lambda data: format(crc32(data), "08x")
    if name == "blake2b-128":
        blake2b = hashlib.blake2b
        return lambda data: blake2b(data, digest_size=16).hexdigest()
    raise UserError(f"unknown hash {name!r}: choose one of {', '.join(HASHES)}")


def data_hash(data: bytes | bytearray | memoryview, name: str = HASH_NAME) -> str:
    """The hash a trace stores for data read or written."""
    return hasher(name)(data)


def compression_of(path: str) -> str:
    """'zst', 'gz' or '' (plain JSON Lines), from the file name."""
    lower = path.lower()
    if lower.endswith(".zst"):
        return "zst"
    if lower.endswith(".gz"):
        return "gz"
    return ""


def _zstandard():
    try:
        import zstandard
    except ModuleNotFoundError as exc:
        raise UserError("traces ending in .zst need the zstandard package: pip install zstandard") from exc
    return zstandard


# -- the three kinds of line --------------------------------------------------------


@dataclass
class TraceHeader:
    """What the trace says about the device it was recorded on."""

    size: int
    start: float  # wall clock (seconds since the epoch) that record times count from
    backend: str = ""
    description: str = ""
    block_size: int = c.PREFERRED_BLOCK_SIZE
    min_block_size: int = c.MIN_BLOCK_SIZE
    max_block_size: int = c.MAX_PAYLOAD
    export_name: str = ""
    readonly: bool = False
    transmission_flags: int = 0
    payload: str = "writes"  # which payloads the records carry: none, writes, all
    hash: str = HASH_NAME
    created: str = ""
    buselab: str = ""
    labels: bool = False  # records carry what they touched ("struct", "label") where the map knew
    extra: dict[str, Any] = field(default_factory=dict)  # keys this reader does not know

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "size": self.size,
            "block_size": self.block_size,
            "min_block_size": self.min_block_size,
            "max_block_size": self.max_block_size,
            "backend": self.backend,
            "description": self.description,
            "export_name": self.export_name,
            "readonly": self.readonly,
            "transmission_flags": self.transmission_flags,
            "payload": self.payload,
            "hash": self.hash,
            "start": round(self.start, 6),
            "created": self.created,
            "buselab": self.buselab,
            **({"labels": True} if self.labels else {}),
            **self.extra,
        }

    @classmethod
    def for_engine(cls, engine: Any, payload: str) -> TraceHeader:
        from .. import __version__

        now = time.time()
        backend = engine.backend
        return cls(
            size=engine.size,
            start=now,
            backend=backend.kind,
            description=backend.describe(),
            export_name=engine.export_name,
            readonly=bool(engine.readonly or backend.readonly),
            transmission_flags=engine.flags,
            payload=payload,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            buselab=__version__,
        )


class TraceRecord(NamedTuple):
    """One request read back from a trace."""

    seq: int
    t: float  # arrival, seconds after the header's start
    cmd: int
    flags: int
    offset: int
    length: int
    latency: float  # seconds
    error: int  # NBD errno, 0 on success
    conn: int
    handle: int
    hash: str | None  # of the data read or written
    data: bytes | None  # the payload, when it was recorded
    line: int  # line number in the trace file (1 is the header)
    struct: str | None = None  # the kind of structure it touched (buselab.fsmap.KINDS), where labelled
    label: str | None = None  # what it touched, in words ("ext4 group 3 inode bitmap (+2 more)")

    @property
    def op(self) -> str:
        return c.CMD_NAMES.get(self.cmd, f"CMD{self.cmd}")


# -- writing --------------------------------------------------------------------------


# One line per request, built with % formatting: json.dumps costs several times
# more, and the trace writer runs this for every request.
RECORD_FORMAT = (
    '{"seq":%d,"t":%.6f,"op":"%s","flags":%d,"offset":%d,"length":%d,"latency":%.9f,"error":%d,"conn":%d,"handle":%d'
)


def encode_record(
    seq: int,
    t: float,
    op: str,
    flags: int,
    offset: int,
    length: int,
    latency: float,
    error: int,
    conn: int,
    handle: int,
    digest: str | None,
    data: bytes | None,
) -> str:
    """One record line (with its newline)."""
    line = RECORD_FORMAT % (seq, t, op, flags, offset, length, latency, error, conn, handle)
    if digest is not None:
        line += ',"hash":"' + digest + '"'
    if data is not None:
        if data and not any(data):
            line += ',"zeros":true'
        else:
            line += ',"data":"' + b64encode(data).decode("ascii") + '"'
    return line + "}\n"


def encode_trailer(records: int, duration: float, **extra: Any) -> str:
    return json.dumps({"end": True, "records": records, "duration": round(duration, 6), **extra}) + "\n"


class TraceWriter:
    """A trace file open for writing: text lines in, (compressed) bytes out."""

    def __init__(self, path: str, *, level: int | None = None, fd: int | None = None) -> None:
        """Write `path` (or the file already open on `fd`, named `path`)."""
        self.path = path
        self.compression = compression_of(path)
        try:
            self._raw: IO[bytes] = open(path if fd is None else fd, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise UserError(f"cannot write trace {path}: {exc.strerror or exc}") from exc
        self._zstd = None
        self._out: Any
        if self.compression == "zst":
            zstandard = _zstandard()
            self._zstd = zstandard
            if level is None:
                # Fast rather than small: recording must keep up with the disk. Payloads are base64,
                # on which zstd's search costs much and finds little; level -3 costs about half of
                # level 1's time there. An 8 MiB window finds blocks written again a little later.
                params = zstandard.ZstdCompressionParameters.from_level(-3, window_log=23)
                compressor = zstandard.ZstdCompressor(compression_params=params)
            else:
                compressor = zstandard.ZstdCompressor(level=level)
            self._out = compressor.stream_writer(self._raw)
        elif self.compression == "gz":
            self._out = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=1 if level is None else level)
        else:
            self._out = self._raw

    def write_header(self, header: TraceHeader) -> None:
        self.write(json.dumps(header.to_json()) + "\n")

    def write(self, text: str) -> None:
        self._out.write(text.encode())

    def write_bytes(self, data: bytes) -> None:
        self._out.write(data)

    def flush(self) -> None:
        """Push what is written so far to the file, decodable (costs a little ratio)."""
        if self._zstd is not None:
            self._out.flush(self._zstd.FLUSH_BLOCK)
        else:
            self._out.flush()
        self._raw.flush()

    def close(self) -> None:
        try:
            if self._out is not self._raw:
                self._out.close()  # ends the compressed stream (and closes the file for zstd)
        finally:
            if not self._raw.closed:
                self._raw.close()


# -- reading --------------------------------------------------------------------------


def _open_binary(path: str) -> IO[bytes]:
    try:
        raw = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError as exc:
        raise UserError(f"trace {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise UserError(f"trace {path} is a directory, not a file") from exc
    except OSError as exc:
        raise UserError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    kind = compression_of(path)
    if kind == "zst":
        zstandard = _zstandard()
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    if kind == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _iter_lines(path: str, stream: IO[bytes]) -> Iterator[bytes]:
    """Lines without their newline; the last may lack one (a cut-off file)."""
    rest = b""
    # read1: one read of the stream at a time. A gzip stream cut short raises EOFError, and a
    # read() that had already gathered some data in that call would lose it with the exception.
    read = getattr(stream, "read1", stream.read)
    while True:
        try:
            chunk = read(_READ_CHUNK)
        except EOFError:  # gzip: the stream ends before its end marker, as zstd's may
            break  # a trace cut short: the reader says so, and --partial uses what came before
        except (OSError, ValueError) as exc:  # corrupt gzip/zstd data
            raise UserError(f"trace {path} is corrupt: cannot decompress it ({exc})") from exc
        except Exception as exc:  # zstandard.ZstdError is not an OSError
            if type(exc).__name__ == "ZstdError":
                raise UserError(f"trace {path} is corrupt: cannot decompress it ({exc})") from exc
            raise
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _require(obj: dict, key: str, kind: type | tuple, path: str, line: int) -> Any:
    value = obj.get(key)
    if value is None:
        raise UserError(f"trace {path} is corrupt: line {line} has no {key!r}")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"trace {path} is corrupt: line {line} has a bad {key!r} ({value!r})")
    return value


def parse_header(path: str, text: bytes) -> TraceHeader:
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a buselab trace: its first line is not a buselab-trace header")
    version = obj.get("version")
    if version is None:
        raise UserError(f"trace {path} is corrupt: its header has no format version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"trace {path} is format version {version!r}; this buselab reads version {FORMAT_VERSION} only:"
            " upgrade buselab or record the trace again"
        )
    size = _require(obj, "size", int, path, 1)
    if size <= 0:
        raise UserError(f"trace {path} is corrupt: line 1 says the device size is {size}")
    payload = obj.get("payload", "writes")
    if payload not in PAYLOAD_MODES:
        raise UserError(f"trace {path} is corrupt: line 1 has an unknown payload mode {payload!r}")
    known = {
        "format",
        "version",
        "size",
        "start",
        "backend",
        "description",
        "block_size",
        "min_block_size",
        "max_block_size",
        "export_name",
        "readonly",
        "transmission_flags",
        "payload",
        "hash",
        "created",
        "buselab",
        "labels",
    }
    digest = obj.get("hash", HASH_NAME)
    if digest not in HASHES:
        raise UserError(f"trace {path} uses hash {digest!r}; this buselab knows {', '.join(HASHES)}")
    return TraceHeader(
        size=size,
        start=float(obj.get("start", 0.0)),
        backend=str(obj.get("backend", "")),
        description=str(obj.get("description", "")),
        block_size=int(obj.get("block_size", c.PREFERRED_BLOCK_SIZE)),
        min_block_size=int(obj.get("min_block_size", c.MIN_BLOCK_SIZE)),
        max_block_size=int(obj.get("max_block_size", c.MAX_PAYLOAD)),
        export_name=str(obj.get("export_name", "")),
        readonly=bool(obj.get("readonly", False)),
        transmission_flags=int(obj.get("transmission_flags", 0)),
        payload=payload,
        hash=digest,
        created=str(obj.get("created", "")),
        buselab=str(obj.get("buselab", "")),
        labels=obj.get("labels") is True,
        extra={k: v for k, v in obj.items() if k not in known},
    )


def parse_record(path: str, obj: dict, line: int, hash_digits: int = HASHES[HASH_NAME]) -> TraceRecord:
    op = _require(obj, "op", str, path, line)
    cmd = OPS.get(op)
    if cmd is None:
        raise UserError(f"trace {path} is corrupt: line {line} has an unknown op {op!r}")
    offset = _require(obj, "offset", int, path, line)
    length = _require(obj, "length", int, path, line)
    if offset < 0 or length < 0:
        raise UserError(f"trace {path} is corrupt: line {line} has a negative offset or length")
    digest = obj.get("hash")
    if digest is not None and (not isinstance(digest, str) or len(digest) != hash_digits):
        raise UserError(f"trace {path} is corrupt: line {line} has a bad 'hash' ({digest!r})")
    data = obj.get("data")
    if data is None and obj.get("zeros") is True:
        data = bytes(length)
    elif data is not None:
        try:
            data = b64decode(data)
        except (binascii.Error, TypeError) as exc:
            raise UserError(f"trace {path} is corrupt: line {line} has a payload that is not base64") from exc
        if len(data) != length:
            raise UserError(
                f"trace {path} is corrupt: line {line} carries {len(data)} bytes of payload for a length of {length}"
            )
    try:
        return TraceRecord(
            seq=int(obj.get("seq", 0)),
            t=float(obj.get("t", 0.0)),
            cmd=cmd,
            flags=int(obj.get("flags", 0)),
            offset=offset,
            length=length,
            latency=float(obj.get("latency", 0.0)),
            error=int(obj.get("error", 0)),
            conn=int(obj.get("conn", 0)),
            handle=int(obj.get("handle", 0)),
            hash=digest,
            data=data,
            line=line,
            # Optional and only explanatory: a value of the wrong type is dropped, not fatal.
            struct=struct if isinstance(struct := obj.get("struct"), str) else None,
            label=label if isinstance(label := obj.get("label"), str) else None,
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"trace {path} is corrupt: line {line} has a field of the wrong type ({exc})") from exc


class TraceReader:
    """A trace open for reading: `header` at once, records by iterating.

    Iterating to the end checks the trailer: a trace without one was cut short
    (buselab killed, disk full) and raises UserError unless `partial` is set,
    in which case `truncated` says so and `trailer` stays None.
    """

    def __init__(self, path: str, *, partial: bool = False) -> None:
        self.path = path
        self.partial = partial
        self.trailer: dict[str, Any] | None = None
        self.truncated = False
        self.records_read = 0
        self._stream = _open_binary(path)
        self._lines = _iter_lines(path, self._stream)
        try:
            first = next(self._lines, None)
        except BaseException:
            self.close()
            raise
        if first is None:
            self.close()
            raise UserError(f"trace {path} is empty: it has no header line")
        try:
            self.header = parse_header(path, first)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._stream.close()
        except Exception:  # noqa: BLE001 - closing a half-read compressed stream must not mask the real error
            pass

    def __iter__(self) -> Iterator[TraceRecord]:
        path = self.path
        number = 1
        loads = json.loads
        digits = HASHES[self.header.hash]
        bad_line = 0  # a line that is not JSON: corrupt, unless nothing follows it (cut short)
        for text in self._lines:
            number += 1
            if bad_line or self.trailer is not None:
                if not text.strip():
                    continue
                if bad_line:
                    raise UserError(f"trace {path} is corrupt: line {bad_line} is not valid JSON")
                raise UserError(f"trace {path} is corrupt: line {number} comes after the end line")
            try:
                obj = loads(text)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                if not text.strip():
                    continue
                bad_line = number
                continue
            if obj.get("end") is True:
                self.trailer = obj
                continue
            self.records_read += 1
            yield parse_record(path, obj, number, digits)
        if bad_line:
            self._cut_short(f"its last line ({bad_line}) is incomplete")
        elif self.trailer is None:
            self._cut_short(f"it stops after line {number} without an end line")
        elif self.trailer.get("records") not in (None, self.records_read):
            raise UserError(
                f"trace {path} is corrupt: its end line counts {self.trailer.get('records')} records"
                f" but it holds {self.records_read}"
            )

    def _cut_short(self, how: str) -> None:
        self.truncated = True
        if not self.partial:
            raise UserError(
                f"trace {self.path} is truncated: {how} (the recording was cut short);"
                f" pass --partial to use the {self.records_read} complete records"
            )


def open_trace(path: str, *, partial: bool = False) -> TraceReader:
    return TraceReader(path, partial=partial)


def read_trailer(path: str) -> dict[str, Any] | None:
    """The end line, found by decompressing but not parsing the records (fast).

    None when the trace has no end line (it was cut short).
    """
    stream = _open_binary(path)
    last = b""
    try:
        for text in _iter_lines(path, stream):
            if text.strip():
                last = text
    finally:
        stream.close()
    try:
        obj = json.loads(last)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("end") is True else None


def describe_trace(path: str) -> str:
    """'trace.jsonl.zst (3.1 MiB)' for messages."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return path
    from ..sizes import human_bytes

    return f"{path} ({human_bytes(size)})"


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HASH_NAME",
    "PAYLOAD_MODES",
    "TraceHeader",
    "TraceRecord",
    "TraceReader",
    "TraceWriter",
    "data_hash",
    "hasher",
    "HASHES",
    "encode_record",
    "encode_trailer",
    "open_trace",
    "read_trailer",
    "compression_of",
]
