"""The one place that builds gRPC client channels.

Every channel gets the same options: message size limits, keepalive pings to notice
dead peers, and no transparent retries beyond gRPC's own (retries are explicit, with
tenacity, in the callers that know what is idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc.aio

from bluemarble.core.limits import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect quickly after a peer restarts (defaults back off up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.min_reconnect_backoff_ms", 200),
)


def insecure_channel(address: str) -> grpc.aio.Channel:
    """A channel to one "host:port" address."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def split_addresses(value: str) -> list[str]:
    """Splits a comma-separated address list ("a:1,b:2"), dropping blanks."""
    return [part.strip() for part in value.split(",") if part.strip()]
