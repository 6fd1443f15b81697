"""The federation's certificates: a chain that verifies, names that match, keys Flower reads."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from medseg.errors import MedsegError
from medseg.federated.certs import Certificates, make_certificates


def test_the_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    certs = make_certificates(
        tmp_path / "c", sites=["h1", "h2"], hosts=["fl.example.org", "10.0.0.5"]
    )
    ca = x509.load_pem_x509_certificate(certs.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    other = make_certificates(tmp_path / "other", sites=["x"])
    other_ca = x509.load_pem_x509_certificate(other.ca_certificate.read_bytes())
    with pytest.raises((ValueError, InvalidSignature)):
        server.verify_directly_issued_by(other_ca)


def test_site_keys_are_private_and_in_the_format_flower_reads(tmp_path):
    certs = make_certificates(tmp_path / "c", sites=["h1", "h2"])
    assert set(certs.node_keys) == {"h1", "h2"}
    for key in certs.node_keys.values():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        private = load_ssh_private_key(key.read_bytes(), password=None)
        public = load_ssh_public_key(key.with_suffix(".pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE((tmp_path / "c" / "server.key").stat().st_mode) == 0o600
    assert Certificates.read(tmp_path / "c").public_keys()[0].name == "h1.pub"
    with pytest.raises(MedsegError, match="already"):
        make_certificates(tmp_path / "c", sites=["h1"])
