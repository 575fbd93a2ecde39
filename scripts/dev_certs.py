#!/usr/bin/env python3
"""Makes a local CA and certificates for a dev cluster and the tests.

    python scripts/dev_certs.py OUTDIR [--nodes n1,n2,n3] [--days 30]

Writes into OUTDIR (PEM files; keys are ECDSA P-256, readable by the owner only):

* ``ca.pem`` / ``ca-key.pem``: the CA that signs everything below (``--tls-ca ca.pem``).
* ``controlplane.pem`` / ``controlplane-key.pem``: the control plane (CN controlplane).
* ``NODE.pem`` / ``NODE-key.pem`` per node id: CN and a DNS SAN equal to the node id, which
  is how the control plane knows a node may heartbeat only for itself.
* ``admin.pem`` / ``admin-key.pem``: bluemarblectl and other operator tools.
* ``etcd.pem`` / ``etcd-key.pem``: an etcd server (for ``--etcd-ca``/``--etcd-cert`` tests).

Every certificate has the SANs ``localhost`` and ``127.0.0.1`` and both the serverAuth and
clientAuth usages: a process presents one certificate as a server and as a client. Dev
use only: the CA key sits next to the certificates. Needs the ``cryptography`` package (a
dev dependency).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONTROL_PLANE = "controlplane"
ADMIN = "admin"
ETCD = "etcd"


@dataclass(frozen=True)
class CertPair:
    """Paths of one certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevCerts:
    """What :func:`make_dev_certs` wrote: the CA and one pair per name."""

    ca: Path
    ca_key: Path
    pairs: dict[str, CertPair]

    def __getitem__(self, name: str) -> CertPair:
        return self.pairs[name]


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "BlueMarble dev"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    out: Path,
    *,
    file_name: str | None = None,
    days: int = 30,
    valid_for: datetime.timedelta | None = None,
) -> CertPair:
    """Issues a certificate for ``common_name`` (CN and DNS SAN, plus localhost and
    127.0.0.1; serverAuth and clientAuth) signed by the CA; writes NAME.pem, NAME-key.pem.
    It is valid for ``days``, or ``valid_for`` from now when given (an expiry a test can
    wait for)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    dns = list(dict.fromkeys([common_name, "localhost"]))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name[:64]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + (valid_for if valid_for is not None else datetime.timedelta(days=days)))
        .add_extension(
            x509.SubjectAlternativeName(
                [*(x509.DNSName(d) for d in dns), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    stem = file_name or common_name
    pair = CertPair(out / f"{stem}.pem", out / f"{stem}-key.pem")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair


def make_ca(
    out: Path, *, days: int = 30, stem: str = "ca", common_name: str = "BlueMarble dev CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA written to ``STEM.pem`` / ``STEM-key.pem``; returns it. Give a
    second CA another ``common_name`` when both are trusted at once (a CA rotation)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / f"{stem}-key.pem", key)
    return cert, key


def make_dev_certs(out: Path, nodes: Sequence[str] = ("n1", "n2", "n3"), *, days: int = 30) -> DevCerts:
    """Writes a new CA and certificates for the control plane, each node, an admin client
    and etcd into ``out`` (created if absent); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(out, days=days)
    names = [CONTROL_PLANE, ADMIN, ETCD, *nodes]
    pairs = {name: issue(ca_cert, ca_key, name, out, days=days) for name in dict.fromkeys(names)}
    return DevCerts(out / "ca.pem", out / "ca-key.pem", pairs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dev_certs.py", description="Make a dev CA and certificates.")
    p.add_argument("outdir", type=Path, help="directory to write the PEM files into")
    p.add_argument("--nodes", default="n1,n2,n3", help="node ids to issue certificates for, comma-separated")
    p.add_argument("--days", type=int, default=30, help="validity in days")
    args = p.parse_args(argv)
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    bad = [n for n in nodes if n in (CONTROL_PLANE, ADMIN, ETCD) or "/" in n or len(n.encode()) > 64]
    if bad:
        p.error(f"node ids {bad} clash with a reserved name or are not file-name-safe (<= 64 bytes, no '/')")
    if args.days <= 0:
        p.error("--days must be > 0")
    certs = make_dev_certs(args.outdir, nodes, days=args.days)
    print(f"CA: {certs.ca}")
    for name, pair in certs.pairs.items():
        print(f"{name}: --tls-cert {pair.cert} --tls-key {pair.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
