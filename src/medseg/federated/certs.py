"""Certificates for a federation: a CA, the SuperLink's TLS certificate and node keys.

``medseg federated certs`` writes::

    ca.crt, ca.key                  the federation's certificate authority (keep ca.key offline)
    server.pem, server.key          the SuperLink's TLS certificate (signed by the CA, with the
                                    server's host names and IP addresses) and its key
    nodes/<site>.key, <site>.pub    one SuperNode authentication key pair per site (EC P-384,
                                    OpenSSH format, what Flower's node authentication reads)
    README.txt                      which file goes where

Each site receives ``ca.crt`` (to check the SuperLink's certificate) and its own
``nodes/<site>.key``; the coordinating site keeps ``server.*`` and registers every
``nodes/*.pub`` with the SuperLink. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medseg.errors import MedsegError

__all__ = ["Certificates", "make_certificates", "node_key_pair"]

_PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Certificates:
    """Where :func:`make_certificates` wrote each file."""

    folder: Path
    ca_certificate: Path
    server_certificate: Path
    server_key: Path
    node_keys: dict[str, Path]  # site -> private key (the public key is beside it, ``.pub``)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Certificates:
        """The files of a certificate folder written by :func:`make_certificates`.

        Raises
        ------
        MedsegError
            When the CA certificate is missing.
        """
        folder = Path(folder)
        if not (folder / "ca.crt").is_file():
            raise MedsegError(f"{folder}: no ca.crt (make one with `medseg federated certs`)")
        keys = {p.stem: p for p in sorted((folder / "nodes").glob("*.key"))}
        return cls(folder, folder / "ca.crt", folder / "server.pem", folder / "server.key", keys)

    def public_keys(self) -> list[Path]:
        """The node public keys (``nodes/*.pub``) the SuperLink should accept."""
        return sorted((self.folder / "nodes").glob("*.pub"))


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def node_key_pair(folder: str | os.PathLike, site: str) -> tuple[Path, Path]:
    """Write an EC P-384 key pair for SuperNode authentication: ``<site>.key`` and ``.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = Path(folder) / f"{site}.key"
    _write_private(
        private,
        key.private_bytes(_PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    public = private.with_suffix(".pub")
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" medseg-{site}\n".encode()
    )
    return private, public


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(
    folder: str | os.PathLike,
    *,
    sites: list[str],
    hosts: list[str] | None = None,
    days: int = 365,
    overwrite: bool = False,
) -> Certificates:
    """Make a CA, a SuperLink certificate for ``hosts`` and one node key pair per site.

    Parameters
    ----------
    folder
        Output folder (created).
    sites
        Site names; each gets ``nodes/<site>.key`` and ``nodes/<site>.pub``.
    hosts
        Host names and IP addresses under which sites reach the SuperLink (default:
        ``localhost`` and ``127.0.0.1``); the certificate is valid only for these.
    days
        Validity of the CA and the server certificate.
    overwrite
        Replace existing files (otherwise an existing ``ca.crt`` is an error).

    Returns
    -------
    Certificates
    """
    folder = Path(folder)
    if (folder / "ca.crt").exists() and not overwrite:
        raise MedsegError(f"{folder}: already holds certificates (use --overwrite)")
    if not sites or len(set(sites)) != len(sites):
        raise MedsegError(f"site names must be given and distinct, got {sites}")
    hosts = hosts or ["localhost", "127.0.0.1"]
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medseg federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    (folder / "ca.crt").write_bytes(ca.public_bytes(_PEM))
    _write_private(folder / "ca.key", ca_key.private_bytes(_PEM, pkcs8, none))
    (folder / "server.pem").write_bytes(server.public_bytes(_PEM))
    _write_private(folder / "server.key", server_key.private_bytes(_PEM, pkcs8, none))
    keys = {site: node_key_pair(folder / "nodes", site)[0] for site in sites}
    (folder / "README.txt").write_text(
        "medseg federation certificates\n"
        f"server certificate valid for: {', '.join(hosts)} until {end:%Y-%m-%d}\n"
        "coordinator keeps: ca.crt, server.pem, server.key, nodes/*.pub (ca.key: offline)\n"
        "each site receives: ca.crt and its own nodes/<site>.key (never another site's)\n"
    )
    return Certificates(
        folder, folder / "ca.crt", folder / "server.pem", folder / "server.key", keys
    )
