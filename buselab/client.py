"""A small synchronous NBD client (fixed newstyle, NBD_OPT_GO, simple replies).

buselab uses it for the demo workload and the tests use it to send exactly the
bytes they mean to. Real clients (qemu, nbdcopy, nbdfuse, the kernel) are
tested separately; this one is just honest and small.
"""

from __future__ import annotations

import itertools
import socket
import struct

from .protocol import constants as c
from .protocol.transmission import encode_request


class NBDError(Exception):
    def __init__(self, errno: int, what: str) -> None:
        super().__init__(f"{what} failed: {c.ERRNO_NAMES.get(errno, errno)}")
        self.errno = errno


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = sock.recv_into(view[pos:])
        if not got:
            raise ConnectionError("server closed the connection")
        pos += got
    return bytes(buf)


class NBDClient:
    def __init__(self, sock: socket.socket, export_name: str = "") -> None:
        self.sock = sock
        self._handles = itertools.count(1)
        self.size, self.flags = self._handshake(export_name)

    @classmethod
    def connect_unix(cls, path: str, export_name: str = "") -> NBDClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock, export_name)

    @classmethod
    def connect_tcp(cls, host: str, port: int, export_name: str = "") -> NBDClient:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, export_name)

    def _handshake(self, export_name: str) -> tuple[int, int]:
        magic, opt, _hflags = struct.unpack(">QQH", _recv_exact(self.sock, 18))
        if magic != c.NBDMAGIC or opt != c.IHAVEOPT:
            raise ConnectionError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", c.CLIENT_FLAG_FIXED_NEWSTYLE | c.CLIENT_FLAG_NO_ZEROES))
        name = export_name.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(c.OPTION_HEADER.pack(c.IHAVEOPT, c.OPT_GO, len(data)) + data)
        size = flags = None
        while True:
            _magic, _opt, rtype, length = c.OPTION_REPLY.unpack(_recv_exact(self.sock, 20))
            payload = _recv_exact(self.sock, length)
            if rtype == c.REP_ACK:
                break
            if rtype & c.REP_FLAG_ERROR:
                raise ConnectionError(f"server refused the export: {payload.decode(errors='replace')}")
            if rtype == c.REP_INFO and struct.unpack_from(">H", payload)[0] == c.INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", payload)
        if size is None or flags is None:
            raise ConnectionError("server sent no export information")
        return size, flags

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes | None = None) -> int:
        handle = next(self._handles)
        header = encode_request(cmd, handle, offset, length, flags)
        if payload is None:
            self.sock.sendall(header)
        else:
            self.sock.sendall(header + payload if len(payload) < 65536 else header)
            if len(payload) >= 65536:
                self.sock.sendall(payload)
        return handle

    def _reply(self, handle: int, what: str) -> None:
        magic, error, got = c.SIMPLE_REPLY.unpack(_recv_exact(self.sock, 16))
        if magic != c.SIMPLE_REPLY_MAGIC or got != handle:
            raise ConnectionError(f"unexpected reply to {what}")
        if error:
            raise NBDError(error, what)

    def read(self, offset: int, length: int) -> bytes:
        handle = self._request(c.CMD_READ, offset, length)
        self._reply(handle, f"READ {offset}+{length}")
        return _recv_exact(self.sock, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        handle = self._request(c.CMD_WRITE, offset, len(data), c.CMD_FLAG_FUA if fua else 0, data)
        self._reply(handle, f"WRITE {offset}+{len(data)}")

    def flush(self) -> None:
        self._reply(self._request(c.CMD_FLUSH, 0, 0), "FLUSH")

    def trim(self, offset: int, length: int) -> None:
        self._reply(self._request(c.CMD_TRIM, offset, length), f"TRIM {offset}+{length}")

    def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        flags = c.CMD_FLAG_NO_HOLE if no_hole else 0
        self._reply(self._request(c.CMD_WRITE_ZEROES, offset, length, flags), f"WRITE_ZEROES {offset}+{length}")

    def close(self) -> None:
        try:
            self._request(c.CMD_DISC, 0, 0)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
