"""The engine: requests in, completions out, everything recorded."""

from .engine import Engine, transmission_flags
from .telemetry import RequestRecord, Snapshot, Telemetry

__all__ = ["Engine", "transmission_flags", "RequestRecord", "Snapshot", "Telemetry"]
