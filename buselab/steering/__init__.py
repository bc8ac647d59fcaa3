"""Steering: the control plane (pause, step, breakpoints, the filter stack, switching).

stepping.py     the gate's controls: pause, resume, step, wait for held requests
breakpoints.py  the breakpoint language and its matcher (pure)
restack.py      filters, backend switches with their copy, power cut, cow commit/discard
results.py      the typed results the lab and the control socket receive
steering.py     `Steering`: the three behind one object, made by the session
"""

from .errors import SteeringError
from .steering import Steering

__all__ = ["Steering", "SteeringError"]
