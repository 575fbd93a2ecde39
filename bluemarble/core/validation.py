"""Validation of identifiers and addresses received from the network.

Each function returns the value (normalised where that is safe) or raises
:class:`bluemarble.core.errors.InvalidArgument` with a message that names the field, says
what was wrong and what is accepted. Messages quote the caller's input only through
:func:`bluemarble.core.limits.echo`, so a megabyte of input yields a short message.
Digits are ASCII digits: ``str.isdigit`` also accepts other scripts' digits ("١"),
which ``int()`` would then read as a number. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import itertools
import unicodedata
from collections.abc import Collection, Iterable, Sized

from bluemarble.core import limits
from bluemarble.core.errors import InvalidArgument
from bluemarble.core.ids import NodeId, PlayerId
from bluemarble.core.limits import echo

MAX_ID_BYTES = 128
MAX_LABEL_BYTES = 64
MAX_CAPACITY = 1_000_000
MAX_ADDRESS_CHARS = 255
_NODE_ID_PUNCTUATION = frozenset("-_.")
_ASCII_DIGITS = frozenset("0123456789")
_HOST_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_IPV4_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_MAX_REASON_CHARS = 100


def ascii_digits(text: str) -> bool:
    """True when ``text`` is one or more of the ASCII digits 0-9 (and nothing else)."""
    return bool(text) and all(c in _ASCII_DIGITS for c in text)


def _unsafe(c: str) -> bool:
    if c == " ":
        return False
    category = unicodedata.category(c)
    # Cc: C0, DEL, C1 (NUL, the ESC of terminal escape codes); Cf: invisible format
    # characters (zero-width space and joiners, BOM, soft hyphen, bidi marks); Z*: every
    # space but the ASCII one, and line/paragraph separators. They make ids that print
    # alike but differ ("z1" and "z\u200b1"); Cf includes the bidi embeddings, overrides
    # and isolates, which reorder the text a console shows around them.
    return category in ("Cc", "Cf", "Zl", "Zp", "Zs")


def _unsafe_chars(value: str) -> str:
    """The characters of ``value`` no id may hold, each once, in order of code point:
    control characters (Unicode category Cc), invisible format characters (Cf, among them
    the bidirectional overrides and isolates), and separators other than the ASCII space."""
    if value.isprintable():  # every request's ids come here: one C call for the usual case
        return ""  # (printable excludes all of Cc, Cf and Z* but the ASCII space)
    return "".join(sorted({c for c in value if _unsafe(c)}))


def made_printable(value: str, max_bytes: int) -> str:
    """``value`` as text :func:`printable_text` accepts, for a message built from what
    another system said (an OS or SQLite error naming a path): each character no id may
    hold becomes '?', and the result is cut to at most ``max_bytes`` of UTF-8."""
    text = value if value.isprintable() else "".join("?" if _unsafe(c) else c for c in value)
    data = text.encode("utf-8", "replace")
    if len(data) > max_bytes:
        text = data[:max_bytes].decode("utf-8", "ignore")
    return text if text.strip() else ""


def printable_text(value: str, field: str) -> str:
    """``value`` if it holds no control character and is not only whitespace: what every
    id and key a person may read in a log or console must be. The message names the
    characters (escaped by repr, so a log line cannot be forged) and never the value.
    Raises InvalidArgument naming ``field``."""
    bad = _unsafe_chars(value)
    if bad:
        raise InvalidArgument(
            f"{field} contains the characters {echo(bad, 40)}; use printable text "
            "(no control, invisible, bidi-override or escape characters, no space but ' ')"
        )
    if value and not value.strip():
        raise InvalidArgument(f"{field} is only whitespace; use printable text")
    return value


def no_edge_space(value: str, field: str) -> str:
    """``value`` if it neither begins nor ends with whitespace: ids are compared exactly,
    so " p1" and "p1" would name two players, and a console shows no difference. Raises
    InvalidArgument naming ``field``."""
    if value != value.strip():
        raise InvalidArgument(
            f"{field} {echo(value)} begins or ends with whitespace; ids are compared exactly, so remove it"
        )
    return value


def utf8_size(value: str, field: str) -> int:
    """The length of ``value`` in UTF-8. A str that has no UTF-8 form (a lone surrogate,
    which is what undecodable bytes of a command line or a file name become in Python)
    raises InvalidArgument naming ``field``: it could be neither sent nor stored."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(
            f"{field} is not valid text: it holds a lone surrogate (undecodable bytes, e.g. of a command line "
            "in another encoding); give UTF-8 text"
        ) from None


def _check_id(field: str, value: str) -> str:
    if not isinstance(value, str):  # a caller's int, None or bytes: a refusal, not an AttributeError
        raise InvalidArgument(f"{field} is a {type(value).__name__}; give a str")
    size = utf8_size(value, field)
    if size == 0:
        raise InvalidArgument(f"{field} is empty; give 1..{MAX_ID_BYTES} bytes of UTF-8")
    if size > MAX_ID_BYTES:
        raise InvalidArgument(
            f"{field} is {size} bytes long; at most {MAX_ID_BYTES} bytes of UTF-8 are allowed"
        )
    return no_edge_space(printable_text(value, field), field)


def _node_id_char(c: str) -> bool:
    return c in _NODE_ID_PUNCTUATION or c in _ASCII_DIGITS or unicodedata.category(c).startswith("L")


def node_id(value: str, field: str = "node_id") -> NodeId:
    """A node id: 1..128 bytes of letters (any script), ASCII digits, '-', '_' and '.',
    and neither "." nor "..": it is a part of etcd keys and of file and host names."""
    _check_id(field, value)
    bad = "".join(sorted({c for c in value if not _node_id_char(c)}))
    if bad:
        raise InvalidArgument(
            f"{field} {echo(value)} contains {echo(bad, 20)}; use letters, digits, '-', '_' or '.'"
        )
    if value in (".", ".."):
        raise InvalidArgument(
            f"{field} {echo(value)} is a path step ('.' or '..' alone); add a letter or a digit")
    return NodeId(value)


def player_id(value: str, field: str = "player_id") -> PlayerId:
    """A player id: 1..128 bytes of UTF-8, no control characters, no whitespace at either end."""
    return PlayerId(_check_id(field, value))


def trade_id(value: str, field: str = "trade_id") -> str:
    """A trade id (the caller's idempotency key for a trade): 1..128 bytes of UTF-8, no
    control characters, no whitespace at either end. Raises InvalidArgument naming ``field``."""
    return _check_id(field, value)


def is_cluster_uid(value: str) -> bool:
    """A cluster identity as the control plane makes it: 32 lowercase hex digits."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def cluster_uid(value: str, field: str = "cluster_uid") -> str:
    """A cluster identity, or "" (none yet). Raises InvalidArgument naming ``field``."""
    if value and not is_cluster_uid(value):
        raise InvalidArgument(f"{field} {echo(value)} is not a cluster identity (32 lowercase hex digits, or empty)")
    return value


def label(value: str, field: str) -> str:
    """A region or zone name: 0..64 bytes, printable, no whitespace."""
    if utf8_size(value, field) > MAX_LABEL_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_LABEL_BYTES} bytes")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidArgument(f"{field} {echo(value)} contains whitespace or control characters")
    return value


def address(value: str, field: str = "address") -> str:
    """A "host:port" address: host is an ASCII DNS name, IPv4, or [IPv6]; port 1..65535.

    Any such address is accepted, including ones only good for listening (0.0.0.0); an
    address other processes must reach is checked with :func:`reachable_address`.
    """
    hint = "expected host:port, e.g. 127.0.0.1:7101, node-1.game:7101 or [::1]:7101"
    shown = echo(value)
    if not value:
        raise InvalidArgument(f"{field} '' is malformed; {hint}")
    if len(value) > MAX_ADDRESS_CHARS:
        raise InvalidArgument(
            f"{field} is {len(value)} characters long; at most {MAX_ADDRESS_CHARS} are allowed ({hint})"
        )
    if not value.isascii():
        raise InvalidArgument(
            f"{field} {shown} is not ASCII; write an international host name in its "
            "ASCII (xn--) form, or use an IP address"
        )
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not ascii_digits(port_text):
        raise InvalidArgument(f"{field} {shown} is malformed; {hint}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"{field} {shown} has port {echo(port_text, 12)} outside 1..65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidArgument(f"{field} {shown} is malformed; {hint}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as e:
            raise InvalidArgument(f"{field} {shown} has an invalid IPv6 host: {_reason(e)}") from e
        return value
    labels = host.split(".")
    if all(ascii_digits(part) for part in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as e:
            raise InvalidArgument(f"{field} {shown} has an invalid IPv4 host: {_reason(e)}") from e
        return value
    for part in labels:
        if not part or len(part) > 63 or not all(c in _HOST_NAME_CHARS for c in part):
            raise InvalidArgument(f"{field} {shown} has an invalid host name; {hint}")
        if part.startswith("-") or part.endswith("-"):
            raise InvalidArgument(f"{field} {shown} has an invalid host name; {hint}")
    return value


def reachable_address(value: str, field: str = "address") -> str:
    """An :func:`address` other processes can connect to: refuses the unspecified
    address (0.0.0.0, [::]), broadcast (255.255.255.255) and multicast hosts, which are
    fine to listen on but reach no particular process."""
    address(value, field)
    host = value.rpartition(":")[0]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if host.startswith("["):
        ip = ipaddress.IPv6Address(host[1:-1])
        ip = ip.ipv4_mapped or ip
    elif all(ascii_digits(part) for part in host.split(".")):
        ip = ipaddress.IPv4Address(host)
    else:
        return value  # a DNS name: whether it resolves is the network's business
    fix = "advertise an address other nodes can connect to (e.g. the pod IP or DNS name)"
    if ip.is_unspecified:
        raise InvalidArgument(f"{field} {echo(value)} has the unspecified host {ip}, which reaches no node; {fix}")
    if ip == _IPV4_BROADCAST:
        raise InvalidArgument(f"{field} {echo(value)} has the broadcast host {ip}; {fix}")
    if ip.is_multicast:
        raise InvalidArgument(f"{field} {echo(value)} has the multicast host {ip}; {fix}")
    return value


def canonical_address(value: str) -> str:
    """A valid :func:`address` in the form two spellings of the same address share:
    host names lower-cased, IPv6 hosts compressed. Compares addresses; never stored."""
    host, _, port = value.rpartition(":")
    if host.startswith("["):
        return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]:{int(port)}"
    return f"{host.lower()}:{int(port)}"


def _reason(e: Exception) -> str:
    text = str(e)
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "..."


def capacity(value: int, field: str = "capacity") -> int:
    """A placement weight: 0 means the default 1; negative or huge values are refused."""
    if value < 0:
        raise InvalidArgument(f"{field} is {value}; it must be >= 1 (0 means the default, 1)")
    if value > MAX_CAPACITY:
        raise InvalidArgument(f"{field} is {value}; at most {MAX_CAPACITY} is allowed")
    return value or 1


def request_id(value: str, field: str = "request_id") -> str:
    """An idempotency key: 1..128 bytes of UTF-8, no control characters, not only whitespace."""
    return _check_id(field, value)


def item_ids(values: Iterable[str], field: str = "item_ids", *, allow_empty: bool = True) -> list[str]:
    """Item ids of one request, as a new list (so an iterator given is read once, here):
    at most :data:`~bluemarble.core.limits.MAX_ITEMS_PER_REQUEST`, each 1..128 bytes, no id
    twice. A string is refused (it would read as one item per character), and so are
    None, anything else that is not a collection of ids, and an id that is not a string."""
    if isinstance(values, str | bytes):
        raise InvalidArgument(f"{field} is one string; give a list of item ids, e.g. [{echo(values, 40)}]")
    most = limits.MAX_ITEMS_PER_REQUEST
    sized = isinstance(values, Sized)
    try:
        # An iterator may not end: read one past the cap, no more.
        listed = list(values) if sized else list(itertools.islice(values, most + 1))
    except TypeError:
        raise InvalidArgument(f"{field} is a {type(values).__name__}; give a list of item ids") from None
    if len(listed) > most:
        counted = str(len(listed)) if sized else f"more than {most}"
        raise InvalidArgument(f"{field} lists {counted} items; at most {most} are allowed per request")
    if not listed and not allow_empty:
        raise InvalidArgument(f"{field} is empty; list at least one item id")
    seen: set[str] = set()
    for i, item in enumerate(listed):
        if not isinstance(item, str):
            raise InvalidArgument(f"{field}[{i}] is a {type(item).__name__}; item ids are strings")
        size = utf8_size(item, f"{field}[{i}]")
        if size == 0:
            raise InvalidArgument(f"{field}[{i}] is empty; item ids are 1..{limits.MAX_ITEM_ID_BYTES} bytes")
        if size > limits.MAX_ITEM_ID_BYTES:
            raise InvalidArgument(
                f"{field}[{i}] is {size} bytes long; item ids are at most {limits.MAX_ITEM_ID_BYTES} bytes"
            )
        no_edge_space(printable_text(item, f"{field}[{i}]"), f"{field}[{i}]")
        if item in seen:
            raise InvalidArgument(f"{field} lists item {echo(item)} twice; each item id may appear once")
        seen.add(item)
    return listed


def log_counter(value: int, field: str) -> int:
    """An epoch, lsn or revision from the wire: 0..2^63-1
    (:data:`~bluemarble.core.limits.MAX_LOG_COUNTER`). The proto types are uint64, but no
    store (SQLite, etcd) holds more than a signed 64-bit integer, so a larger value is
    refused here, with the field named, instead of failing in storage."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{field} is a {type(value).__name__}; give a whole number")
    if value < 0 or value > limits.MAX_LOG_COUNTER:
        raise InvalidArgument(
            f"{field} is {echo(value, 40)}; it must be between 0 and 2^63-1 ({limits.MAX_LOG_COUNTER})"
        )
    return value


def gold(value: int, field: str = "gold") -> int:
    """An amount of gold: a whole number, 0..2^53."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{field} is a {type(value).__name__}; gold is a whole number")
    if value < 0 or value > limits.MAX_GOLD:
        raise InvalidArgument(f"{field} is {echo(value, 40)}; it must be between 0 and 2^53 ({limits.MAX_GOLD})")
    return value


def data_key(value: str, field: str = "key") -> str:
    """A player-data key: 1..128 bytes of UTF-8, no control characters, not only whitespace."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} is a {type(value).__name__}; give a str")
    size = utf8_size(value, field)
    if size == 0 or size > limits.MAX_DATA_KEY_BYTES:
        raise InvalidArgument(f"{field} is {size} bytes long; give 1..{limits.MAX_DATA_KEY_BYTES} bytes of UTF-8")
    return printable_text(value, field)


def data_value(value: bytes, field: str = "value") -> bytes:
    """A player-data value: bytes, at most 64 KiB."""
    if not isinstance(value, bytes):
        raise InvalidArgument(f"{field} is a {type(value).__name__}; give bytes (e.g. text.encode())")
    if len(value) > limits.MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"{field} is {len(value)} bytes; at most {limits.MAX_VALUE_BYTES} bytes (64 KiB) are allowed"
        )
    return value


def game_system(value: str, known: Collection[str], field: str = "system") -> str:
    """A game system named in the cluster config's consistency table."""
    if value not in known:
        names = ", ".join(sorted(known)[:16]) or "none"
        raise InvalidArgument(f"{field} {echo(value, 40)} is not a game system of the cluster config (known: {names})")
    return value


def system_name(value: str, field: str = "system") -> str:
    """A game system's name as a caller gives it (whether the cluster config knows it is
    the server's to say): a str of 1..128 bytes of printable UTF-8."""
    return _check_id(field, value)


def flag(value: bool, field: str) -> bool:
    """A yes/no option: True or False, not a string such as "no" (which Python reads as true)."""
    if not isinstance(value, bool):
        raise InvalidArgument(f"{field} is a {type(value).__name__}; give True or False")
    return value


def limit(value: int, most: int, field: str = "limit") -> int:
    """How many to list: a whole number 1..``most``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{field} is a {type(value).__name__}; give a whole number")
    if not 1 <= value <= most:
        raise InvalidArgument(f"{field} is {echo(value, 40)}; give 1..{most}")
    return value
