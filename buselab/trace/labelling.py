"""Each recorded request's label ("struct" and "label" in its line), made by the writer process.

The serving threads never label anything. The recorder's feeder thread hands the writer
process the disk's map whenever the session's Labeller has replaced it (a map is replaced
whole, never changed: its identity says when), in a frame of its own; the writer looks every
request up in it as it formats the request's line (FsMap.label: two bisects), with the
request's whole payload where the trace keeps it, so journal blocks are decoded ("jbd2
commit, transaction 57"); requests without data are looked up by the C formatter, from the
map's lookup table (`RecordLabels.table`, _fastlines.c), with the same result. Where the map
knows nothing (no partition table, no file system) the frame says None and lines carry no
label: readers count such requests as "unknown".

    frame = map_frame(fsmap)               # the feeder thread, in the server
    fsmap = read_map_frame(body)           # the writer, when is_map_frame(body)
    labels = RecordLabels(fsmap)
    suffix = labels.suffix(cmd, offset, length, data)   # b',"struct":"journal","label":"..."'
"""

from __future__ import annotations

import copy
import json
import pickle
from array import array

from ..fsmap import FsMap
from ..protocol import constants as c

MAP_MARK = b"\xff\xff\xff\xff"  # where a batch frame has its record count: no batch holds 2^32-1
LABELLED = frozenset((c.CMD_READ, c.CMD_WRITE, c.CMD_WRITE_ZEROES, c.CMD_TRIM, c.CMD_CACHE))
_CACHE_LIMIT = 4096


def knows_something(fsmap: FsMap | None) -> bool:
    return fsmap is not None and bool(fsmap.filesystems or fsmap.table)


def map_frame(fsmap: FsMap | None) -> bytes:
    """The frame body that gives the writer `fsmap` (or tells it to stop labelling: None, or
    a map that knows nothing). What `label` does not use (the file list, the regions' details,
    what `buselab layout` prints) is left out: a big file system's map is mostly that."""
    if not knows_something(fsmap):
        return MAP_MARK + pickle.dumps(None)
    assert fsmap is not None
    slim = copy.copy(fsmap)
    slim.regions = []
    slim.filesystems = []
    slim.partitions = []
    slim.notes = []
    return MAP_MARK + pickle.dumps(slim, protocol=pickle.HIGHEST_PROTOCOL)


def is_map_frame(body: bytes | memoryview) -> bool:
    return bytes(body[:4]) == MAP_MARK


def read_map_frame(body: bytes | memoryview) -> FsMap | None:
    return pickle.loads(body[4:])  # noqa: S301 - from our own server, down our own pipe


class RecordLabels:
    """The JSON a request's line gains from a map: `,"struct":KIND,"label":TEXT[,"more":N]`."""

    def __init__(self, fsmap: FsMap) -> None:
        self.fsmap = fsmap
        self._cache: dict[tuple[str, str, int], bytes] = {}

    def suffix(self, cmd: int, offset: int, length: int, data: bytes | memoryview | None) -> bytes:
        if cmd not in LABELLED:
            return b""
        label = self.fsmap.label(offset, length, data)
        key = (label.text, label.kind, label.more)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) >= _CACHE_LIMIT:  # texts with transaction ids and paths vary
                self._cache.clear()
            cached = self._cache[key] = _suffix(label.kind, label.text) + (
                b',"more":%d' % label.more if label.more else b""
            )
        return cached

    _table: tuple | None = None

    @property
    def table(self) -> tuple:
        """The map's lookup table for the C formatter (_fastlines.c: its comment says the layout),
        made once per map: requests without data are looked up there, 10 times faster."""
        if self._table is None:
            starts, ends, labels, ranks, gap = self.fsmap.lookup_table()
            mask = sum(1 << cmd for cmd in LABELLED)
            self._table = (
                array("Q", starts).tobytes(),
                array("Q", ends).tobytes(),
                bytes(ranks),
                tuple(_suffix(label.kind, label.text) for label in labels),
                _suffix(gap.kind, gap.text),
                mask,
            )
        return self._table


def _suffix(kind: str, text: str) -> bytes:
    return f',"struct":{json.dumps(kind)},"label":{json.dumps(text)}'.encode()
