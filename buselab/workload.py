"""The demo's built-in workload: a file-system-like story told over real NBD.

It formats (metadata spread over the disk, as mkfs writes superblock copies and
inode tables), writes files and reads them back, commits a journal with FUA
and FLUSH, deletes (TRIM), and throws bursts of random reads, then starts
again. It is a real NBD client, so the server, telemetry and lab see exactly
what they would see from a kernel.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time

from .client import NBDClient

BLOCK = 4096


class DemoWorkload:
    def __init__(self, socket_path: str, *, pace: float = 0.002, seed: int = 1) -> None:
        self.socket_path = socket_path
        self.pace = pace  # seconds between requests: slow enough to watch
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="buselab-demo", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(5)

    def _sleep(self, factor: float = 1.0) -> bool:
        return self.stop_event.wait(self.pace * factor)

    def _run(self) -> None:
        try:
            with NBDClient.connect_unix(self.socket_path) as nbd:
                while not self.stop_event.is_set():
                    self.run_round(nbd)
                    self.rounds += 1
        except (OSError, ConnectionError) as exc:
            if not self.stop_event.is_set():
                self.errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a workload failure is shown, not raised
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def run_round(self, nbd: NBDClient) -> None:
        """One pass of the story; each step checks the stop flag."""
        size = nbd.size
        blocks = size // BLOCK
        rnd = self.random
        steps = [self._format, self._write_files, self._journal, self._random_reads, self._delete]
        files: list[tuple[int, bytes]] = []
        for step in steps:
            if self.stop_event.is_set():
                return
            step(nbd, blocks, rnd, files)

    def _format(self, nbd: NBDClient, blocks: int, rnd: random.Random, files: list) -> None:
        groups = max(1, min(16, blocks // 8192))
        for g in range(groups):
            base = g * (blocks // groups)
            nbd.write(base * BLOCK, b"\x53\xef" + bytes(BLOCK - 2))  # superblock copy
            for i in range(1, 5):  # bitmaps and inode table
                if self._sleep():
                    return
                nbd.write((base + i) * BLOCK, bytes([g % 256]) * BLOCK)
        nbd.flush()

    def _write_files(self, nbd: NBDClient, blocks: int, rnd: random.Random, files: list) -> None:
        for _ in range(8):
            start = rnd.randrange(blocks // 4, max(blocks // 4 + 1, blocks - 64))
            count = rnd.choice([1, 2, 4, 16, 32])
            data = rnd.randbytes(count * BLOCK)
            nbd.write(start * BLOCK, data)
            files.append((start * BLOCK, hashlib.sha256(data).digest(), len(data)))
            if self._sleep(4):
                return
        for offset, digest, length in files:
            if hashlib.sha256(nbd.read(offset, length)).digest() != digest:
                self.errors.append(f"read back of {length} bytes at {offset} did not match")
            if self._sleep():
                return

    def _journal(self, nbd: NBDClient, blocks: int, rnd: random.Random, files: list) -> None:
        journal = blocks // 2
        for i in range(4):
            nbd.write((journal + i) * BLOCK, rnd.randbytes(BLOCK))
            if self._sleep():
                return
        nbd.flush()
        nbd.write((journal + 4) * BLOCK, b"commit" + bytes(BLOCK - 6), fua=True)

    def _random_reads(self, nbd: NBDClient, blocks: int, rnd: random.Random, files: list) -> None:
        for _ in range(64):
            nbd.read(rnd.randrange(blocks) * BLOCK, BLOCK)
            if self._sleep(0.5):
                return

    def _delete(self, nbd: NBDClient, blocks: int, rnd: random.Random, files: list) -> None:
        for offset, _digest, length in files[: len(files) // 2]:
            nbd.trim(offset, length)
            if self._sleep():
                return
        nbd.flush()
        time.sleep(0)  # let other threads run between rounds
