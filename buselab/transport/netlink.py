"""The nbd generic-netlink family: connect, disconnect and status of /dev/nbdN.

The attribute layout follows include/uapi/linux/nbd-netlink.h; the messages are
built and parsed by pyroute2 (a maintained netlink library) rather than by hand.
"""

from __future__ import annotations

import logging

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

# pyroute2 logs every message at DEBUG: `buselab -v` is about buselab, not netlink traffic.
logging.getLogger("pyroute2").setLevel(logging.WARNING)

FAMILY = "nbd"
VERSION = 1
CMD_CONNECT = 1
CMD_DISCONNECT = 2
CMD_RECONFIGURE = 3
CMD_STATUS = 5
CFLAG_DESTROY_ON_DISCONNECT = 1
CFLAG_DISCONNECT_ON_CLOSE = 2


class nbdmsg(genlmsg):  # noqa: N801 - pyroute2 names message classes this way
    prefix = "NBD_ATTR_"
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sockets"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "device_list"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sockets(nla):  # noqa: N801
        prefix = "NBD_SOCK_"
        nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):  # noqa: N801
            nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_list(nla):  # noqa: N801
        nla_map = (("NBD_DEVICE_ITEM_UNSPEC", "none"), ("NBD_DEVICE_ITEM", "device_item"))

        class device_item(nla):  # noqa: N801
            nla_map = (
                ("NBD_DEVICE_UNSPEC", "none"),
                ("NBD_DEVICE_INDEX", "uint32"),
                ("NBD_DEVICE_CONNECTED", "uint8"),
            )


class NbdNetlink:
    """A bound generic-netlink socket for the nbd family."""

    def __init__(self) -> None:
        self.sock = GenericNetlinkSocket()
        try:
            self.sock.bind(FAMILY, nbdmsg)
        except Exception:
            self.sock.close()
            raise

    @staticmethod
    def available() -> bool:
        """Does the running kernel have the nbd netlink family (nbd loaded, >= 4.12)?"""
        try:
            NbdNetlink().close()
        except (NetlinkError, OSError, RuntimeError, ValueError):
            return False
        return True

    def _request(self, cmd: int, attrs: list) -> list:
        msg = nbdmsg()
        msg["cmd"] = cmd
        msg["version"] = VERSION
        msg["attrs"] = attrs
        return list(self.sock.nlm_request(msg, msg_type=self.sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))

    def connect(
        self,
        sockets: list[int],
        size: int,
        block_size: int,
        server_flags: int,
        *,
        index: int | None = None,
        timeout: int = 0,
        dead_conn_timeout: int = 0,
        client_flags: int = 0,
    ) -> int:
        """Give the kernel our socket fds; returns the device index it used."""
        attrs: list = [
            ("NBD_ATTR_SIZE_BYTES", size),
            ("NBD_ATTR_BLOCK_SIZE_BYTES", block_size),
            ("NBD_ATTR_SERVER_FLAGS", server_flags),
            ("NBD_ATTR_CLIENT_FLAGS", client_flags),
            ("NBD_ATTR_SOCKETS", {"attrs": [("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", fd)]}) for fd in sockets]}),
        ]
        if timeout:
            attrs.append(("NBD_ATTR_TIMEOUT", timeout))
        if dead_conn_timeout:
            attrs.append(("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout))
        if index is not None:
            attrs.append(("NBD_ATTR_INDEX", index))
        for reply in self._request(CMD_CONNECT, attrs):
            got = reply.get_attr("NBD_ATTR_INDEX")
            if got is not None:
                return int(got)
        if index is None:
            raise OSError("the kernel did not say which nbd device it connected")
        return index

    def disconnect(self, index: int) -> None:
        self._request(CMD_DISCONNECT, [("NBD_ATTR_INDEX", index)])

    def connected(self, index: int) -> bool | None:
        """Whether device `index` is connected; None if the kernel has no such device."""
        try:
            replies = self._request(CMD_STATUS, [("NBD_ATTR_INDEX", index)])
        except NetlinkError:
            return None
        for reply in replies:
            devices = reply.get_attr("NBD_ATTR_DEVICE_LIST")
            if devices is None:
                continue
            for item in devices.get_attrs("NBD_DEVICE_ITEM"):
                if item.get_attr("NBD_DEVICE_INDEX") == index:
                    return bool(item.get_attr("NBD_DEVICE_CONNECTED"))
        return None

    def close(self) -> None:
        self.sock.close()
