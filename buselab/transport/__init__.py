"""Transports: the only code that touches sockets and ioctls."""
