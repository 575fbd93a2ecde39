"""Encoding of etcd values: protobuf messages as JSON, so `etcdctl get` is readable.

Field names are the proto names (snake_case) and defaults are included, so an operator
sees every field. Decoding ignores unknown fields, so an older control plane can read a
record written by a newer one during a rolling upgrade.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from bluemarble.core.errors import CorruptRecord

M = TypeVar("M", bound=Message)

__all__ = ["CorruptRecord", "decode", "encode"]


def encode(message: Message) -> bytes:
    """Compact JSON with proto field names and default values included."""
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=None,
        sort_keys=True,
    ).encode("utf-8")


def decode(data: bytes, message_type: type[M], key: str = "?") -> M:
    """Parses ``data``; raises CorruptRecord naming the key when it does not parse."""
    message = message_type()
    try:
        json_format.Parse(data.decode("utf-8"), message, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as e:
        raise CorruptRecord(f"etcd key {key} holds an unreadable {message_type.__name__}: {e}") from e
    return message
