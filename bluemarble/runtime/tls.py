"""Process-wide TLS for gRPC: which certificate this process presents, which CA it trusts.

Why one process-wide setting: every server and channel of a process is built in one
place (:mod:`bluemarble.runtime.grpc_server`, :mod:`bluemarble.runtime.channels`), and a
process has one identity. ``main`` calls :func:`configure` once at start-up from
``--tls-cert``, ``--tls-key`` and ``--tls-ca``; nothing else needs to know.

What the files mean (the same on every process):

* Server side: cert + key => TLS; plus a CA => mutual TLS (a client certificate signed by
  that CA is required and verified; one without is refused during the handshake).
* Client side (every channel the process opens): the CA verifies servers; cert + key are
  presented as the client certificate (one cert per process serves both roles, so it
  carries both the serverAuth and clientAuth usages).

Rotation without restart: servers use ``grpc.dynamic_ssl_server_credentials`` whose
fetcher re-reads the files when their (mtime, size, inode) changes, so the next TLS
handshake uses the new certificate and CA; connections already open keep theirs. Client
channels read the current files when they are built, and gRPC Python has no reloading
client credentials: a channel keeps the certificate it was built with for every later
reconnect, which fails once that certificate expires. So each reload counts a
``generation``, and whoever caches channels (:func:`bluemarble.runtime.channels.outdated`)
replaces a channel built in an older generation with a new one on its next use once the
change is seen (the files are looked at every :data:`RECHECK_S` at most). A rotation that leaves the files unreadable or
mismatched is logged and the last good material stays in use.

Plaintext is the default: without :func:`configure` (or with ``None``) nothing changes.
"""

from __future__ import annotations

import argparse
import os
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from bluemarble.core.errors import InvalidArgument
from bluemarble.runtime.settings import EnvArgumentParser

log = structlog.get_logger(__name__)

MAX_PEM_BYTES = 1 << 20
"""Largest certificate, key or CA file read (a CA bundle is far smaller)."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of this process's certificate chain, private key and trusted CA bundle.

    ``cert`` and ``key`` come together or not at all; ``ca`` alone is a client that
    verifies servers without presenting a certificate.
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def has_identity(self) -> bool:
        return self.cert is not None and self.key is not None

    @property
    def mutual(self) -> bool:
        """True when a server built with these files requires client certificates."""
        return self.has_identity and self.ca is not None


def files_from_flags(cert: str, key: str, ca: str, flag_prefix: str = "--tls") -> TlsFiles | None:
    """The TLS files named by the ``--tls-cert/--tls-key/--tls-ca`` flags ("" = not given),
    or None for plaintext (no flag given).

    Raises InvalidArgument (naming the flag and what to do) when only one of cert and key
    is given, a file is missing or unreadable, a file is not PEM, or the key does not
    belong to the certificate.
    """
    if not (cert or key or ca):
        return None
    if bool(cert) != bool(key):
        given, missing = ("cert", "key") if cert else ("key", "cert")
        raise InvalidArgument(
            f"{flag_prefix}-{given} is given without {flag_prefix}-{missing}; give both "
            "(the certificate chain and its private key) or neither"
        )
    files = TlsFiles(Path(cert) if cert else None, Path(key) if key else None, Path(ca) if ca else None)
    load_material(files, flag_prefix)
    return files


def _read(path: Path, flag: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_PEM_BYTES:
            raise InvalidArgument(f"{flag} {path}: {size} bytes; a PEM file is at most {MAX_PEM_BYTES} bytes")
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise InvalidArgument(f"{flag} {path}: no such file; check the path (or the mounted Secret)") from e
    except PermissionError as e:
        raise InvalidArgument(f"{flag} {path}: permission denied; make it readable by this user") from e
    except IsADirectoryError as e:
        raise InvalidArgument(f"{flag} {path}: is a directory; name the PEM file inside it") from e
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class Material:
    """The bytes of the TLS files as last read, and the stamps they were read at."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None
    stamps: tuple[tuple[int, int, int] | None, ...]


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stamps(files: TlsFiles) -> tuple[tuple[int, int, int] | None, ...]:
    return (_stamp(files.cert), _stamp(files.key), _stamp(files.ca))


def load_material(files: TlsFiles, flag_prefix: str = "--tls") -> Material:
    """Reads and checks the files: each is PEM, the key matches the certificate, the CA
    bundle parses. Raises InvalidArgument naming the flag otherwise."""
    stamps = _stamps(files)
    cert = _read(files.cert, f"{flag_prefix}-cert") if files.cert else None
    key = _read(files.key, f"{flag_prefix}-key") if files.key else None
    ca = _read(files.ca, f"{flag_prefix}-ca") if files.ca else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if files.cert and files.key:
        try:
            context.load_cert_chain(files.cert, files.key)
        except ssl.SSLError as e:
            raise InvalidArgument(
                f"{flag_prefix}-cert {files.cert} and {flag_prefix}-key {files.key} do not form a "
                f"certificate and its private key ({e.reason or e}); check that the key belongs to the certificate"
            ) from e
    if ca is not None:
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except ssl.SSLError as e:
            raise InvalidArgument(f"{flag_prefix}-ca {files.ca}: not a CA certificate bundle ({e.reason or e})") from e
    return Material(cert, key, ca, stamps)


RECHECK_S = 5.0
"""How often :meth:`TlsConfig.current_generation` looks at the files (a stat of each):
the longest a client channel goes on presenting a rotated certificate."""


class TlsConfig:
    """The TLS files of this process and their current contents, re-read on change.

    Thread-safe: gRPC calls the server credential fetcher from its own threads.
    """

    def __init__(self, files: TlsFiles, flag_prefix: str = "--tls"):
        self.files = files
        self._flag_prefix = flag_prefix  # names the flags in the errors of a bad reload
        self._lock = threading.Lock()
        self._material = load_material(files, flag_prefix)
        self._generation = 0
        self._checked_s = time.monotonic()

    @property
    def generation(self) -> int:
        """How many times the files were reloaded (0: as read at start)."""
        return self._generation

    def current_generation(self) -> int:
        """:attr:`generation`, after looking at the files if that was not done in the
        last :data:`RECHECK_S` seconds. Cheap enough for every call of a hot path."""
        now_s = time.monotonic()
        if now_s - self._checked_s >= RECHECK_S:
            self._checked_s = now_s
            self.material()
        return self._generation

    @property
    def mutual(self) -> bool:
        return self.files.mutual

    def material(self) -> Material:
        """The files' contents, re-read when a file's stamp changed since the last read.
        Keeps the last good contents (and logs why) when the new files do not load."""
        with self._lock:
            stamps = _stamps(self.files)
            if stamps != self._material.stamps:
                try:
                    fresh = load_material(self.files, self._flag_prefix)
                except InvalidArgument as e:
                    log.warning("TLS files changed but do not load; keeping the previous ones", error=str(e))
                    # Remember the stamps, so the failure is logged once per change.
                    self._material = Material(self._material.cert, self._material.key, self._material.ca, stamps)
                else:
                    self._material = fresh
                    self._generation += 1
                    log.info("TLS files reloaded", cert=str(self.files.cert), ca=str(self.files.ca),
                             generation=self._generation)
            return self._material

    def _server_configuration(self, material: Material) -> Any:
        assert material.cert is not None and material.key is not None
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert)], root_certificates=material.ca
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a server: TLS with this process's certificate, client
        certificates required when a CA is configured. Each new handshake first checks
        whether the files changed. Raises InvalidArgument when there is no certificate."""
        if not self.files.has_identity:
            raise InvalidArgument(
                "a server needs --tls-cert and --tls-key (only --tls-ca was given); give both, or no TLS flag"
            )
        current = [self.material()]

        def fetch() -> Any:
            material = self.material()
            if material is current[0]:
                return None  # unchanged: gRPC keeps the configuration it has
            current[0] = material
            return self._server_configuration(material)

        return grpc.dynamic_ssl_server_credentials(
            self._server_configuration(current[0]),
            fetch,
            require_client_authentication=self.files.ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a new channel, from the files as they are now: the CA verifies
        the server (system roots when none is given), the certificate is presented."""
        material = self.material()
        return grpc.ssl_channel_credentials(
            root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
        )


def add_flags(p: EnvArgumentParser, role: str) -> None:
    """The ``--tls-cert/--tls-key/--tls-ca`` flags every BlueMarble process shares."""
    p.add_flag("--tls-cert", default="", help=f"PEM certificate chain this {role} presents (as server and client)")
    p.add_flag("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_flag(
        "--tls-ca",
        default="",
        help="PEM CA bundle: verifies servers; with --tls-cert, servers also require client certificates "
        "it signed (mutual TLS)",
    )


def config_from_flags(p: argparse.ArgumentParser, args: argparse.Namespace, *, server: bool) -> TlsConfig | None:
    """The TLS configuration the parsed :func:`add_flags` flags describe (None: plaintext).
    Exits through ``p.error`` (status 2, one line naming the flag) when the files are
    unusable, or when a serving process (``server``) has a CA but no certificate."""
    try:
        files = files_from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    except InvalidArgument as e:
        p.error(str(e))
    if files is None:
        return None
    if server and not files.has_identity:
        p.error("--tls-ca needs --tls-cert and --tls-key here: a server presents a certificate; give all three")
    return TlsConfig(files)


_config: TlsConfig | None = None


def configure(config: TlsConfig | None) -> None:
    """Sets the process's TLS configuration (None: plaintext). Called once at start-up,
    before any server or channel is built; tests reset it to None afterwards."""
    global _config
    _config = config


def current() -> TlsConfig | None:
    """The process's TLS configuration, or None for plaintext."""
    return _config


def certificate_names(pem: bytes) -> frozenset[str]:
    """The identities the first certificate of a PEM chain names: its Common Name and its
    DNS subject alternative names (what :func:`peer_identities` sees of it as a client)."""
    from cryptography import x509  # only where a process checks its own certificate

    cert = x509.load_pem_x509_certificate(pem)
    names = {str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)}
    try:
        names.update(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return frozenset(names)


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> frozenset[str]:
    """The identities a verified client certificate names: its Common Name and its DNS
    subject alternative names (``context.auth_context()`` of a call). Empty when the peer
    presented no certificate (plaintext, or TLS without client authentication)."""
    names: set[str] = set()
    # grpc 1.85 names the DNS SANs "peer_dns"; older releases "x509_dns_name".
    for key in ("x509_common_name", "peer_dns", "x509_dns_name"):
        for value in auth_context.get(key, ()):
            names.add(value.decode("utf-8", "replace"))
    return frozenset(names)
