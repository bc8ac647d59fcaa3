"""The error steering raises for a command that makes no sense."""

from __future__ import annotations

from ..errors import UserError


class SteeringError(UserError):
    """A steering command that makes no sense; the message is one line and nothing changed."""
