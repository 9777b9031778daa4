"""A throw-away PKI for the LDAP TLS tests, made with ``cryptography``.

One trusted CA signs the good server certificate (valid for ``localhost``,
``127.0.0.1`` and ``::1``), one for another host name and an expired one; a
second CA, never trusted, signs a certificate with the right names. Keys are
unencrypted PEM (PKCS#8) readable by the test user, as slapd built with
GnuTLS (Debian) wants them.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GOOD_NAMES = ("localhost", "127.0.0.1", "::1")
OTHER_HOST = "ldap.other.example"


@attrs.frozen
class CertificatePair:
    """A server certificate and its key, as PEM files."""

    certificate: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sftpauth tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _alternative_names(names) -> x509.SubjectAlternativeName:
    general = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


class TestPKI:
    """Every certificate the TLS tests need, written under ``folder``.

    ``ca_bundle`` is the trusted CA (PEM); ``good``, ``wrong_name``,
    ``expired`` and ``untrusted`` are server certificate/key pairs.
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self._ca_key, self._ca = self._make_ca("sftpauth test CA")
        self._other_key, self._other_ca = self._make_ca("sftpauth untrusted CA")
        self.ca_bundle = self.folder / "ca.pem"
        self.ca_bundle.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))
        self.other_ca_bundle = self.folder / "other-ca.pem"
        self.other_ca_bundle.write_bytes(self._other_ca.public_bytes(serialization.Encoding.PEM))
        day = datetime.timedelta(days=1)
        self.good = self._server("good", "localhost", GOOD_NAMES, self._ca_key, self._ca)
        self.wrong_name = self._server("wrong-name", OTHER_HOST, (OTHER_HOST,), self._ca_key, self._ca)
        self.expired = self._server(
            "expired", "localhost", GOOD_NAMES, self._ca_key, self._ca, not_before=self.now - 30 * day, not_after=self.now - day
        )
        self.untrusted = self._server("untrusted", "localhost", GOOD_NAMES, self._other_key, self._other_ca)

    def issue(self, label: str, common_name: str, names) -> CertificatePair:
        """Another server certificate from the trusted CA, for ``names`` (host names or IP addresses)."""
        return self._server(label, common_name, tuple(names), self._ca_key, self._ca)

    def dated(self, label: str, not_before: datetime.datetime, not_after: datetime.datetime) -> CertificatePair:
        """A certificate for localhost from the trusted CA, valid from ``not_before`` to ``not_after``."""
        return self._server(label, "localhost", GOOD_NAMES, self._ca_key, self._ca, not_before=not_before, not_after=not_after)

    def _make_ca(self, common_name: str):
        key = _key()
        name = _name(common_name)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(days=1))
            .not_valid_after(self.now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, certificate

    def _server(self, label, common_name, names, ca_key, ca, not_before=None, not_after=None) -> CertificatePair:
        key = _key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or self.now - datetime.timedelta(days=1))
            .not_valid_after(not_after or self.now + datetime.timedelta(days=20))
            .add_extension(_alternative_names(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        pair = CertificatePair(self.folder / f"{label}-cert.pem", self.folder / f"{label}-key.pem")
        pair.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(pair.key, key)
        return pair
