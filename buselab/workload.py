"""The demo's built-in workload: a file-system-like story told over real NBD.

Each round formats (superblock copies, bitmaps and zeroed inode tables spread
over the disk in block groups, as mkfs.ext4 lays them out, and a journal in the
middle), writes files and fsyncs them (journal blocks, FLUSH, a commit block
with FUA), reads them back and checks them, throws a burst of random reads,
deletes half the files (TRIM, and a journal commit), then starts again. It is
a real NBD client, so the server, telemetry and lab see exactly what they
would see from a kernel. Between steps it waits `pace` seconds, so the story
can be watched; with pace=0 it runs flat out (tests, traces).

Failing requests is what the lab invites (N, an error filter, a power cut), so
a request that fails is counted and the story carries on (a write that failed
leaves no file to read back); a connection that breaks is made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .client import NBDClient, NBDError

BLOCK = 4096
GROUPS = 16  # block groups the "format" lays out (fewer on tiny disks)
INODE_TABLE_BLOCKS = 8
JOURNAL_BLOCKS = 64
SUPERBLOCK_MAGIC = b"\x53\xef"  # ext4's, at offset 56 of the superblock


RECONNECT_WAIT = 0.5  # seconds before connecting again after the connection broke
KEEP_ERRORS = 50  # the newest error messages kept (the count keeps counting)


class TolerantClient:
    """The client as the story uses it: a request that fails (EIO from an error
    filter, a step that failed it) is counted and the story goes on. read gives
    None for a failure, the others False. A broken connection still raises."""

    def __init__(self, nbd: NBDClient, workload: DemoWorkload) -> None:
        self.nbd = nbd
        self.size = nbd.size
        self.workload = workload

    def _failed(self, exc: NBDError) -> None:
        self.workload.requests += 1
        self.workload._error(str(exc))

    def read(self, offset: int, length: int) -> bytes | None:
        try:
            data = self.nbd.read(offset, length)
        except NBDError as exc:
            self._failed(exc)
            return None
        self.workload.requests += 1
        return data

    def _done(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> bool:
        try:
            fn(*args, **kwargs)
        except NBDError as exc:
            self._failed(exc)
            return False
        self.workload.requests += 1
        return True

    def write(self, offset: int, data: bytes, fua: bool = False) -> bool:
        return self._done(self.nbd.write, offset, data, fua=fua)

    def flush(self) -> bool:
        return self._done(self.nbd.flush)

    def trim(self, offset: int, length: int) -> bool:
        return self._done(self.nbd.trim, offset, length)

    def write_zeroes(self, offset: int, length: int) -> bool:
        return self._done(self.nbd.write_zeroes, offset, length)


class DemoWorkload:
    """The demo's client. Injected errors are what the lab invites: a request that
    fails is counted (`error_count`, the newest messages in `errors`) and the story
    carries on; a connection that breaks is made again."""

    def __init__(self, socket_path: str, *, pace: float = 0.002, seed: int = 1) -> None:
        self.socket_path = socket_path
        self.pace = pace  # seconds between requests: slow enough to watch
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.rounds = 0
        self.phase = "starting"  # the step of the story running now (the lab shows it)
        self.errors: deque[str] = deque(maxlen=KEEP_ERRORS)  # the newest error messages
        self.error_count = 0  # every error since the start
        self.requests = 0  # requests answered, successfully or not
        self.connects = 0  # connections made (more than one: it reconnected)
        self.client: NBDClient | None = None  # the connection in use
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="buselab-demo", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def last_error(self) -> str | None:
        return self.errors[-1] if self.errors else None

    def _error(self, message: str) -> None:
        self.error_count += 1
        self.errors.append(message)

    def _sleep(self, factor: float = 1.0) -> bool:
        """Wait between requests; True when asked to stop."""
        if self.pace <= 0:
            return self.stop_event.is_set()
        return self.stop_event.wait(self.pace * factor)

    def _run(self) -> None:
        """Rounds until stopped; connect again (after RECONNECT_WAIT) whenever the connection breaks."""
        while not self.stop_event.is_set():
            try:
                nbd = NBDClient.connect_unix(self.socket_path)
            except (OSError, ConnectionError) as exc:
                if self.stop_event.is_set():
                    return
                self._error(f"connect: {exc}")
                self.phase = "reconnecting"
                self.stop_event.wait(RECONNECT_WAIT)
                continue
            self.connects += 1
            self.client = nbd
            try:
                while not self.stop_event.is_set():
                    self.run_round(nbd)
                    if not self.stop_event.is_set():
                        self.rounds += 1
            except (OSError, ConnectionError) as exc:
                if self.stop_event.is_set():
                    return
                self._error(f"connection lost: {exc}")
            except Exception as exc:  # noqa: BLE001 - a workload failure is shown, not raised
                self._error(f"{type(exc).__name__}: {exc}")
            finally:
                self.client = None
                with contextlib.suppress(OSError):
                    nbd.close()
            self.phase = "reconnecting"
            self.stop_event.wait(RECONNECT_WAIT)

    def run_round(self, client: NBDClient | TolerantClient) -> None:
        """One pass of the story; each step checks the stop flag."""
        nbd = client if isinstance(client, TolerantClient) else TolerantClient(client, self)
        blocks = nbd.size // BLOCK
        rnd = self.random
        files: list[tuple[int, bytes, int]] = []
        steps = [
            ("format", self._format),
            ("write files", self._write_files),
            ("read back", self._read_back),
            ("random reads", self._random_reads),
            ("delete", self._delete),
        ]
        for name, step in steps:
            if self.stop_event.is_set():
                return
            self.phase = name
            step(nbd, blocks, rnd, files)
            if self._sleep(100):  # a breath between steps, so each is visible
                return

    # -- the layout -----------------------------------------------------------
    @staticmethod
    def groups(blocks: int) -> int:
        return max(1, min(GROUPS, blocks // 256))

    def journal_start(self, blocks: int) -> int:
        """First block of the journal: inside the middle group, clear of its metadata."""
        groups = self.groups(blocks)
        per_group = blocks // groups
        return (groups // 2) * per_group + max(4 + INODE_TABLE_BLOCKS, per_group // 2 - JOURNAL_BLOCKS // 2)

    def data_slots(self, blocks: int) -> list[int]:
        """Start blocks of 32-block file slots clear of metadata and the journal."""
        groups = self.groups(blocks)
        per_group = blocks // groups
        journal = self.journal_start(blocks)
        slots = []
        for g in range(groups):
            first = g * per_group + 4 + INODE_TABLE_BLOCKS
            last = (g + 1) * per_group - 32
            for start in range(first, last + 1, 32):
                if start + 32 <= journal or start >= journal + JOURNAL_BLOCKS:
                    slots.append(start)
        return slots

    # -- the steps --------------------------------------------------------------
    def _format(self, nbd: TolerantClient, blocks: int, rnd: random.Random, files: list) -> None:
        groups = self.groups(blocks)
        per_group = blocks // groups
        for g in range(groups):
            base = g * per_group
            superblock = bytearray(BLOCK)
            superblock[1024 + 56 : 1024 + 58] = SUPERBLOCK_MAGIC
            superblock[1024 + 90 : 1024 + 92] = g.to_bytes(2, "little")  # block group number
            nbd.write(base * BLOCK, bytes(superblock))
            if self._sleep():
                return
            for i in (1, 2):  # block and inode bitmaps
                nbd.write((base + i) * BLOCK, bytes([0xFF]) * 16 + bytes(BLOCK - 16))
                if self._sleep():
                    return
            # The inode table is zeroed, not written: WRITE_ZEROES.
            nbd.write_zeroes((base + 4) * BLOCK, INODE_TABLE_BLOCKS * BLOCK)
            if self._sleep():
                return
        journal = self.journal_start(blocks)
        nbd.write_zeroes(journal * BLOCK, JOURNAL_BLOCKS * BLOCK)
        nbd.flush()

    def _commit(self, nbd: TolerantClient, blocks: int, rnd: random.Random, count: int) -> None:
        """A journal transaction: descriptor and data blocks, FLUSH, then the commit block with FUA."""
        journal = self.journal_start(blocks)
        slot = rnd.randrange(JOURNAL_BLOCKS - count - 1)
        for i in range(count):
            nbd.write((journal + slot + i) * BLOCK, b"\xc0\x3b\x39\x98" + rnd.randbytes(BLOCK - 4))
            if self._sleep():
                return
        nbd.flush()
        nbd.write((journal + slot + count) * BLOCK, b"\xc0\x3b\x39\x98commit" + bytes(BLOCK - 10), fua=True)

    def _write_files(self, nbd: TolerantClient, blocks: int, rnd: random.Random, files: list) -> None:
        slots = self.data_slots(blocks)
        for start in rnd.sample(slots, min(8, len(slots))):
            count = rnd.choice([1, 2, 4, 8, 16, 32])
            data = rnd.randbytes(count * BLOCK)
            if nbd.write(start * BLOCK, data):  # a write that failed wrote no file to read back
                files.append((start * BLOCK, hashlib.sha256(data).digest(), len(data)))
            if self._sleep(4):
                return
        self._commit(nbd, blocks, rnd, 4)

    def _read_back(self, nbd: TolerantClient, blocks: int, rnd: random.Random, files: list) -> None:
        for offset, digest, length in files:
            data = nbd.read(offset, length)
            if data is not None and hashlib.sha256(data).digest() != digest:
                self._error(f"read back of {length} bytes at {offset} did not match")
            if self._sleep():
                return

    def _random_reads(self, nbd: TolerantClient, blocks: int, rnd: random.Random, files: list) -> None:
        for _ in range(64):
            nbd.read(rnd.randrange(blocks) * BLOCK, BLOCK)
            if self._sleep(0.5):
                return

    def _delete(self, nbd: TolerantClient, blocks: int, rnd: random.Random, files: list) -> None:
        for offset, _digest, length in files[: len(files) // 2]:
            nbd.trim(offset, length)
            if self._sleep():
                return
        self._commit(nbd, blocks, rnd, 2)
