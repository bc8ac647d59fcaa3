"""Storage: where a buselab disk's bytes live, and the layers stacked over them.

    base.py       the Backend interface (BUSE's buse_operations), Capabilities, BackendError
    backends/     ram, file (lo), null, plugin, cow
    filters/      delay, error, throttle, readonly, cache: layers with a backend's interface
    stack.py      a base backend with filters over it: what requests meet
    registry.py   the one place that makes backends and filters from names and specs
    spec.py       parsing the small values specs take (sizes, durations, errnos, ranges)

Nothing here knows about connections, the engine or the lab.
"""
