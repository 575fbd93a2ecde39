"""Who may call what: the admin bearer token and node identities from client certificates.

Two checks, both made by the servicer that knows the request (the control plane's
:mod:`controlplane.server.service`):

* **Admin RPCs** (state-changing operator calls: :data:`ADMIN_METHODS`) need
  ``authorization: Bearer <token>`` metadata when the control plane has an admin token
  (``--admin-token-file`` or ``BLUEMARBLE_ADMIN_TOKEN``). Missing: UNAUTHENTICATED; wrong:
  PERMISSION_DENIED. The comparison takes the same time whatever the token, so it does
  not leak how much of a guess was right.
* **Node identity**: with mutual TLS, a node may register, heartbeat and deregister only
  for itself: the node id of the request must be the Common Name or a DNS SAN of the
  client certificate (:data:`NODE_METHODS`), else PERMISSION_DENIED.

* **The cluster's own calls** (:class:`ClusterPeers`, on a shard node): with mutual TLS,
  the calls of the trade protocol and fencing (Prepare, Commit, Abort, TradeBatch, Fence,
  and prepare/commit/abort on a Calls stream) are served only to a client certificate
  that names the control plane; replication (Replicate, GetSnapshot, GetEntries) only to
  one that names a node of the cluster. A game server's or an operator's certificate gets
  PERMISSION_DENIED: it could otherwise mint gold (a Prepare receiving gold, then its
  Commit) or stop a shard's writes (a Fence at a made-up epoch).

Without a token and without mutual TLS these checks let everything through (dev, tests:
the network is the boundary; docs/decisions.md). A token file is re-read when it changes
(a rotated Kubernetes Secret), like the TLS files.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import structlog

from bluemarble.core.errors import InvalidArgument
from bluemarble.runtime import channels, retry, tls

log = structlog.get_logger(__name__)

ADMIN_METHODS = frozenset({"SetConfig", "DrainNode", "UndrainNode", "ForcePromote"})
"""ControlPlane RPCs that change cluster state on an operator's behalf. (Node lifecycle
RPCs are checked by certificate instead; trades are data plane; reads are open.)"""

NODE_METHODS = frozenset({"RegisterNode", "Heartbeat", "HeartbeatStream", "DeregisterNode"})
"""ControlPlane RPCs a node makes for itself: the request's node_id must be the caller's."""

AUTHORIZATION = "authorization"
BEARER = "Bearer "
ADMIN_TOKEN_ENV = "BLUEMARBLE_ADMIN_TOKEN"
MAX_TOKEN_BYTES = 4096


class Verdict(enum.Enum):
    """The outcome of checking a call's bearer token against the configured one."""

    OK = "ok"
    MISSING = "missing"  # no authorization metadata, or not a Bearer one: UNAUTHENTICATED
    WRONG = "wrong"  # a bearer token that is not the configured one: PERMISSION_DENIED


def check_bearer(authorization: str | None, expected: str) -> Verdict:
    """Purely computational: the verdict for an ``authorization`` metadata value.

    The comparison is constant-time in the presented token (``hmac.compare_digest``)."""
    scheme, _, presented = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":  # the scheme's name is case-insensitive (RFC 9110, 11.1)
        return Verdict.MISSING
    presented = presented.strip()
    if not presented:
        return Verdict.MISSING
    ok = hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8"))
    return Verdict.OK if ok else Verdict.WRONG


_ADMIN_REFUSALS = retry.FailureLog()


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (empty without one)."""
    return ((AUTHORIZATION, BEARER + token),) if token else ()


def _metadata_value(metadata: Iterable[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v if isinstance(v, str) else bytes(v).decode("utf-8", "replace")
    return None


def read_token_file(path: Path, flag: str) -> str:
    """The token in ``path`` (surrounding whitespace and a final newline removed).

    Raises InvalidArgument naming ``flag`` when the file is missing, unreadable, empty or
    too large."""
    try:
        size = path.stat().st_size
        if size > MAX_TOKEN_BYTES:
            raise InvalidArgument(f"{flag} {path}: {size} bytes; a token is at most {MAX_TOKEN_BYTES} bytes")
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as e:
        raise InvalidArgument(f"{flag} {path}: no such file; check the path (or the mounted Secret)") from e
    except PermissionError as e:
        raise InvalidArgument(f"{flag} {path}: permission denied; make it readable by this user") from e
    except IsADirectoryError as e:
        raise InvalidArgument(f"{flag} {path}: is a directory; name the token file inside it") from e
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{flag} {path}: not UTF-8 text; write the token as text") from e
    _check_token(token, f"{flag} {path}")
    return token


def _check_token(token: str, where: str) -> None:
    if not token:
        raise InvalidArgument(f"{where}: the token is empty; write a token (e.g. `openssl rand -hex 32`)")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise InvalidArgument(f"{where}: the token has spaces or control characters; use printable ASCII")
    if not token.isascii():  # gRPC metadata carries ASCII only: the call would fail before it is sent
        raise InvalidArgument(f"{where}: the token has characters outside ASCII; use printable ASCII")


def check_token(token: str, where: str) -> str:
    """``token`` if it can travel as a bearer token (printable ASCII, no spaces);
    InvalidArgument naming ``where`` otherwise."""
    _check_token(token, where)
    return token


class AdminToken:
    """The admin token of a control plane: from a file (re-read when it changes) or a
    fixed value (the environment variable)."""

    def __init__(self, *, value: str | None = None, path: Path | None = None, flag: str = "--admin-token-file"):
        assert (value is None) != (path is None), "give the token or its file"
        self._path = path
        self._flag = flag
        self._lock = threading.Lock()
        if value is not None:
            _check_token(value, ADMIN_TOKEN_ENV)
            self._value = value
            self._stamp: object = None
        else:
            assert path is not None
            self._stamp = self._stat()
            self._value = read_token_file(path, flag)

    @classmethod
    def from_settings(cls, token_file: str) -> AdminToken | None:
        """The token of ``--admin-token-file`` (preferred) or ``BLUEMARBLE_ADMIN_TOKEN``,
        or None when neither is set. Raises InvalidArgument for an unusable token."""
        if token_file:
            return cls(path=Path(token_file))
        value = os.environ.get(ADMIN_TOKEN_ENV)
        if value is None:
            return None
        if not value.strip():
            # Set but empty (a Secret key with no value): running without a token would
            # open the admin calls without a word.
            raise InvalidArgument(
                f"{ADMIN_TOKEN_ENV} is set but empty; give it a token (e.g. `openssl rand -hex 32`), "
                "or unset it to run without one"
            )
        return cls(value=value.strip())

    def _stat(self) -> object:
        assert self._path is not None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def value(self) -> str:
        """The current token; a changed file is re-read (a bad new file keeps the old
        token and is logged)."""
        if self._path is None:
            return self._value
        with self._lock:
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._value = read_token_file(self._path, self._flag)
                    log.info("admin token file reloaded", path=str(self._path))
                except InvalidArgument as e:
                    log.warning("admin token file changed but cannot be used; keeping the previous token",
                                error=str(e))
            return self._value


Ctx = grpc.aio.ServicerContext[Any, Any]


class ServerAuth:
    """The checks one server makes (see the module docstring). ``token`` None: admin RPCs
    are open; ``node_identity`` False: node ids are not checked against certificates."""

    def __init__(self, token: AdminToken | None = None, node_identity: bool = False,
                 node_pattern: re.Pattern[str] | None = None):
        self.token = token
        self.node_identity = node_identity
        self.node_pattern = node_pattern

    @classmethod
    def for_process(cls, token: AdminToken | None, node_pattern: re.Pattern[str] | None = None) -> ServerAuth:
        """Node identities are checked when this process serves mutual TLS."""
        config = tls.current()
        return cls(token, node_identity=config is not None and config.mutual, node_pattern=node_pattern)

    async def admin(self, context: Ctx, method: str) -> None:
        """Aborts the call unless it carries the admin token (when one is configured)."""
        if self.token is None:
            return
        authorization = _metadata_value(context.invocation_metadata(), AUTHORIZATION)
        verdict = check_bearer(authorization, self.token.value())
        if verdict is Verdict.OK:
            return
        peer = context.peer()
        # Each refusal counts; a peer repeating one logs it once, then a summary with the
        # count every few seconds (per method, reason and peer host).
        _ADMIN_REFUSALS.failed(f"{method} {verdict.value} {channels.peer_host(peer)}", time.monotonic(),
                               "admin rpc refused", rpc=method, reason=verdict.value, peer=peer)
        if verdict is Verdict.MISSING:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} is an admin RPC and needs 'authorization: Bearer <token>' metadata "
                "(bluemarblectl: --token-file or BLUEMARBLE_ADMIN_TOKEN)"
                + ("; the authorization given is not a Bearer one" if authorization else ""),
            )
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method}: the bearer token is not this cluster's admin token",
        )

    async def node(self, context: Ctx, method: str, node_id: str) -> None:
        """Aborts the call unless ``node_id`` matches the node id pattern (when one is
        set) and the client certificate names it (with mTLS)."""
        if self.node_pattern is not None and self.node_pattern.fullmatch(node_id) is None:
            log.warning("node rpc refused: not a node id of this cluster", rpc=method, node_id=node_id[:128],
                        peer=context.peer())
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method}: {node_id[:128]!r} is not a node id of this cluster (ids must match "
                f"{self.node_pattern.pattern[:100]!r}, the control plane's --node-id-pattern)",
            )
        if not self.node_identity:
            return
        names = tls.peer_identities(context.auth_context())
        if node_id in names:
            return
        await deny_other_node(context, method, node_id, names, f"{method} for node {node_id[:128]!r}",
                              "a node may act only for itself (its certificate's CN or a DNS SAN is its node id)")


async def deny_other_node(context: Ctx, method: str, claimed: str, names: Iterable[str], doing: str,
                          rule: str) -> None:
    """Logs and aborts the call PERMISSION_DENIED: ``doing`` names node ``claimed``, but
    the client certificate names ``names``; ``rule`` says what a node may do instead."""
    shown = sorted(names)[:4]
    log.warning("node rpc refused: certificate names another node", rpc=method, node_id=claimed[:128],
                certificate=shown, peer=context.peer())
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED,
        f"{doing}: the client certificate names {(', '.join(shown) or 'nothing')[:200]}; {rule}",
    )



CONTROL_PLANE_IDENTITY = "controlplane"
"""The name a control-plane certificate carries by default (CN or DNS SAN), besides the
DNS names nodes dial it by (``--control-plane``)."""

COORDINATOR_CALLS = frozenset({"prepare", "commit", "abort"})
"""Calls-stream kinds only the control plane's trade coordinator sends."""


def control_plane_identities(
    addresses: Iterable[str], names: Iterable[str] = (CONTROL_PLANE_IDENTITY,)
) -> frozenset[str]:
    """The names a control-plane client certificate may carry: ``names`` plus the host of
    each address that is a DNS name (the name its server certificate is already checked
    against when a node dials it). IP addresses and ``localhost`` are left out: every dev
    certificate names them."""
    found = {n for n in names if n}
    for address in addresses:
        host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        if host and host != "localhost":
            found.add(host)
    return frozenset(found)


class ClusterPeers:
    """Which callers a shard node serves the cluster's own calls to (see the module
    docstring). ``is_node`` says whether a name is a node id this node knows (from its
    assignments); without mutual TLS (``enabled`` False) every caller passes."""

    def __init__(self, control_plane: Iterable[str], is_node: Callable[[str], bool], *, enabled: bool):
        self.control_plane_names = frozenset(control_plane)
        self._is_node = is_node
        self.enabled = enabled

    @classmethod
    def for_node(cls, control_plane: Iterable[str], is_node: Callable[[str], bool]) -> ClusterPeers:
        """Checks on when this process serves mutual TLS."""
        config = tls.current()
        return cls(control_plane, is_node, enabled=config is not None and config.mutual)

    def is_control_plane(self, context: Ctx) -> bool:
        if not self.enabled:
            return True
        return bool(tls.peer_identities(context.auth_context()) & self.control_plane_names)

    def refusal(self, context: Ctx, method: str, wanted: str) -> str:
        """The PERMISSION_DENIED message for ``method`` (logged once here)."""
        names = sorted(tls.peer_identities(context.auth_context()))[:4]
        log.warning("cluster rpc refused: the caller's certificate is not the cluster's", rpc=method,
                    certificate=names, wanted=wanted, peer=context.peer())
        shown = ", ".join(names) or "nothing"
        return (f"{method} is served only to {wanted}; the client certificate names {shown[:200]} "
                "(see the chart README, 'TLS certificates')")

    async def require_control_plane(self, context: Ctx, method: str) -> None:
        """Aborts the call PERMISSION_DENIED unless the caller is the control plane."""
        if not self.is_control_plane(context):
            names = ", ".join(sorted(self.control_plane_names)[:3])
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                self.refusal(context, method, f"the control plane (a certificate naming {names})"))

    def acting_for(self, context: Ctx) -> frozenset[str] | None:
        """The names the caller's certificate carries, when mutual TLS is on (None: every
        caller passes)."""
        return frozenset(tls.peer_identities(context.auth_context())) if self.enabled else None

    async def require_node(self, context: Ctx, method: str) -> None:
        """Aborts the call PERMISSION_DENIED unless the caller's certificate names a node
        this node knows."""
        if not self.enabled:
            return
        if any(self._is_node(name) for name in tls.peer_identities(context.auth_context())):
            return
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            self.refusal(context, method, "the cluster's nodes (a certificate naming a node id)"))


MAX_PATTERN_CHARS = 256


def compile_node_id_pattern(value: str, flag: str) -> re.Pattern[str] | None:
    """The compiled ``--node-id-pattern`` (None when empty). Raises InvalidArgument naming
    ``flag`` for a pattern that is too long or does not compile."""
    if not value:
        return None
    if len(value) > MAX_PATTERN_CHARS:
        raise InvalidArgument(f"{flag} is {len(value)} characters; give at most {MAX_PATTERN_CHARS}")
    try:
        return re.compile(value)
    except re.error as e:
        raise InvalidArgument(f"{flag} {value!r} is not a regular expression: {e}") from e
