"""What a user-written backend (`buselab plugin FILE`) may import: the public names.

    from buselab.backends import Backend, BackendError, Capabilities

The implementations live in `buselab.storage`; this module only keeps the
names a plugin uses stable. Nothing inside buselab imports it.
"""

from __future__ import annotations

from .storage.base import Backend, BackendError, Capabilities, wire_errno

__all__ = ["Backend", "BackendError", "Capabilities", "wire_errno"]
