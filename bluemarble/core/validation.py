"""Validation of identifiers and addresses received from the network.

Each function returns the value (normalised where that is safe) or raises
:class:`bluemarble.core.errors.InvalidArgument` with a message that names the field, says
what was wrong and what is accepted. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress

from bluemarble.core.errors import InvalidArgument
from bluemarble.core.ids import NodeId, PlayerId

MAX_ID_BYTES = 128
MAX_LABEL_BYTES = 64
MAX_CAPACITY = 1_000_000
_ID_FORBIDDEN = frozenset("/\\")


def _check_id(field: str, value: str) -> str:
    size = len(value.encode("utf-8"))
    if size == 0:
        raise InvalidArgument(f"{field} is empty; give 1..{MAX_ID_BYTES} bytes of UTF-8")
    if size > MAX_ID_BYTES:
        raise InvalidArgument(
            f"{field} is {size} bytes long; at most {MAX_ID_BYTES} bytes of UTF-8 are allowed"
        )
    return value


def node_id(value: str, field: str = "node_id") -> NodeId:
    """A node id: 1..128 bytes, printable, no whitespace, no '/' or '\\' (it is a key part)."""
    _check_id(field, value)
    bad = sorted({c for c in value if c in _ID_FORBIDDEN or c.isspace() or not c.isprintable()})
    if bad:
        raise InvalidArgument(
            f"{field} {value!r} contains {''.join(bad)!r}; use letters, digits, '-', '_' or '.'"
        )
    return NodeId(value)


def player_id(value: str, field: str = "player_id") -> PlayerId:
    """A player id: any UTF-8 string of 1..128 bytes."""
    return PlayerId(_check_id(field, value))


def label(value: str, field: str) -> str:
    """A region or zone name: 0..64 bytes, printable, no whitespace."""
    if len(value.encode("utf-8")) > MAX_LABEL_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_LABEL_BYTES} bytes")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidArgument(f"{field} {value!r} contains whitespace or control characters")
    return value


def address(value: str, field: str = "address") -> str:
    """A "host:port" address: host is a DNS name, IPv4, or [IPv6]; port 1..65535."""
    hint = "expected host:port, e.g. 127.0.0.1:7101, node-1.game:7101 or [::1]:7101"
    if not value or len(value) > 255:
        raise InvalidArgument(f"{field} {value!r} is malformed; {hint}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidArgument(f"{field} {value!r} is malformed; {hint}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"{field} {value!r} has port {port} outside 1..65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidArgument(f"{field} {value!r} is malformed; {hint}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as e:
            raise InvalidArgument(f"{field} {value!r} has an invalid IPv6 host: {e}") from e
        return value
    labels = host.split(".")
    if all(part.isdigit() for part in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as e:
            raise InvalidArgument(f"{field} {value!r} has an invalid IPv4 host: {e}") from e
        return value
    for part in labels:
        if not part or len(part) > 63 or not all(c.isalnum() or c == "-" for c in part):
            raise InvalidArgument(f"{field} {value!r} has an invalid host name; {hint}")
        if part.startswith("-") or part.endswith("-"):
            raise InvalidArgument(f"{field} {value!r} has an invalid host name; {hint}")
    return value


def capacity(value: int, field: str = "capacity") -> int:
    """A placement weight: 0 means the default 1; negative or huge values are refused."""
    if value < 0:
        raise InvalidArgument(f"{field} is {value}; it must be >= 1 (0 means the default, 1)")
    if value > MAX_CAPACITY:
        raise InvalidArgument(f"{field} is {value}; at most {MAX_CAPACITY} is allowed")
    return value or 1
