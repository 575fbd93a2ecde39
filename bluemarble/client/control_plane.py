"""Client library for the control plane, used by shard nodes, bluemarblectl and tests.

:class:`ControlPlaneClient` talks to any of several control-plane addresses (every
replica serves every RPC). A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED moves
on to the next address, with capped exponential backoff between rounds (tenacity), and
gives up after a bounded number of attempts. Other statuses are raised at once as the
matching :class:`bluemarble.core.errors.BlueMarbleError`, so callers handle NotFound,
AlreadyExists, ... by type.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog
import tenacity

from bluemarble.core import errors
from bluemarble.runtime.channels import insecure_channel
from bluemarble.v1 import controlplane_pb2_grpc, trade_pb2_grpc

log = structlog.get_logger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 5.0


def to_error(e: grpc.aio.AioRpcError, address: str) -> errors.BlueMarbleError:
    """The BlueMarble error for a failed call (UNAVAILABLE names the address)."""
    details = e.details() or e.code().name
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        details = f"control plane {address} unavailable: {details}"
    return errors.from_status_name(e.code().name, details)


class ControlPlaneClient:
    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = 6,
        max_backoff_s: float = 2.0,
    ):
        if not addresses:
            raise ValueError("at least one control-plane address is required")
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self._attempts = attempts
        self._max_backoff_s = max_backoff_s
        self._channels = [insecure_channel(a) for a in self.addresses]
        self._current = 0

    @property
    def current_address(self) -> str:
        return self.addresses[self._current]

    def rotate(self) -> None:
        """Moves to the next address (after a stream broke on the current one)."""
        self._current = (self._current + 1) % len(self.addresses)

    def control_plane(self) -> controlplane_pb2_grpc.ControlPlaneStub:
        return controlplane_pb2_grpc.ControlPlaneStub(self._channels[self._current])  # type: ignore[no-untyped-call]

    def trades(self) -> trade_pb2_grpc.TradeCoordinatorStub:
        return trade_pb2_grpc.TradeCoordinatorStub(self._channels[self._current])  # type: ignore[no-untyped-call]

    async def call(
        self,
        rpc: Callable[[Any], Callable[..., Awaitable[T]]],
        request: Any,
        *,
        timeout_s: float | None = None,
        attempts: int | None = None,
    ) -> T:
        """Calls ``rpc(stub)(request)``, failing over between addresses on UNAVAILABLE.

        ``rpc`` picks the method from a ControlPlaneStub, e.g.
        ``lambda s: s.ListNodes``. Raises the mapped BlueMarbleError of the last attempt.
        """
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(attempts or self._attempts),
            wait=tenacity.wait_exponential(multiplier=0.1, max=self._max_backoff_s),
            retry=tenacity.retry_if_exception(
                lambda e: isinstance(e, errors.Unavailable | errors.DeadlineExceeded)
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(rpc, request, timeout_s or self.timeout_s)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self, rpc: Callable[[Any], Callable[..., Awaitable[T]]], request: Any, timeout_s: float
    ) -> T:
        address = self.current_address
        try:
            return await rpc(self.control_plane())(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            error = to_error(e, address)
            if isinstance(error, errors.Unavailable | errors.DeadlineExceeded) and len(self.addresses) > 1:
                self._current = (self._current + 1) % len(self.addresses)
                log.info("control plane unreachable, trying another", failed=address,
                         next=self.current_address, error=e.code().name)
            raise error from e

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)
