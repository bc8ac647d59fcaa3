"""The NBD protocol as pure functions and state machines: no sockets, no threads."""
