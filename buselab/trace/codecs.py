"""crc32 and base64 for traces: the SIMD implementations when installed.

Recording hashes every request's data and base64-encodes every write's
payload. The standard library's crc32 (zlib 1.2) takes about 1.8 us for
4 KiB and binascii's base64 about 5.5 us; zlib-ng's crc32 (same polynomial,
same values) takes 0.4 us and pybase64 0.45 us (decoding: 1 us against
16 us). At 4 jobs x iodepth 8 that difference is most of what recording
costs. Both are dependencies of buselab; the fallbacks keep a trace readable
and writable where a wheel is missing, only slower.
"""

from __future__ import annotations

import binascii

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - the dependency is missing
    from zlib import crc32

try:
    from pybase64 import b64decode as _b64decode
    from pybase64 import b64encode
except ImportError:  # pragma: no cover - the dependency is missing

    def b64encode(data: bytes | bytearray | memoryview) -> bytes:
        return binascii.b2a_base64(data, newline=False)

    def b64decode(text: str | bytes) -> bytes:
        return binascii.a2b_base64(text, strict_mode=True)

else:

    def b64decode(text: str | bytes) -> bytes:
        """Strict: anything but base64 raises binascii.Error."""
        return _b64decode(text, validate=True)


__all__ = ["crc32", "b64encode", "b64decode"]
