"""The Web Manager's certificate: ``ssl_certificate``, or a self-signed one made once.

The generated certificate (EC P-256, valid two years) is kept in
``data_folder/manager/certificate.pem`` with its key, mode 0600, so its
SHA-256 fingerprint, logged at every start, stays the same and can be
pinned by the administrators' browsers. An expired one is replaced.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from typing import Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.logger import Logger

from sftpauth.config.errors import ConfigError, ConfigProblem
from sftpauth.config.models import ManagerServiceSettings
from sftpauth.private_files import write_private_file
from sftpauth.tls import CertificateProblem, ServerCertificate, load_server_certificate, server_options

_log = Logger()
GENERATED_FOLDER = "manager"
GENERATED_FILE = "certificate.pem"
VALIDITY = datetime.timedelta(days=730)
RESTART_ADVICE = "replace the file and restart sftpauth (the Web Manager reads its certificate at start-up)"
GENERATED_ADVICE = "restart sftpauth: it generates a new one"


@attrs.frozen
class ManagerCertificate:
    options: ssl.CertificateOptions
    fingerprint: str  # SHA-256 of the leaf certificate, colon-separated hex
    subject: str
    not_after: datetime.datetime
    generated: bool
    loaded: ServerCertificate = attrs.field(repr=False)


def load_certificate(settings: ManagerServiceSettings, config_path: str, data_folder: str) -> ManagerCertificate:
    """The certificate of one manager service; ConfigError naming the option when unusable."""
    if settings.ssl_certificate:
        try:
            return _from_pem_file(settings.ssl_certificate, generated=False)
        except ValueError as error:
            raise ConfigError(
                [ConfigProblem(config_path, None, f"services/{settings.id}", "ssl_certificate", str(error))]
            ) from None
    path = os.path.join(data_folder, GENERATED_FOLDER, GENERATED_FILE)
    try:
        existing = _from_pem_file(path, generated=True) if os.path.exists(path) else None
        if existing is None or existing.not_after <= datetime.datetime.now(datetime.timezone.utc):
            _write_generated(path, settings.address)
            existing = _from_pem_file(path, generated=True)
            _log.info("generated the self-signed Web Manager certificate {path}", path=path)
        return existing
    except (OSError, ValueError) as error:
        message = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            [
                ConfigProblem(
                    config_path, None, "server", "data_folder",
                    f"the generated Web Manager certificate {path}: {message} (remove it to generate a new one)",
                )
            ]
        ) from None


def _from_pem_file(path: str, generated: bool) -> ManagerCertificate:
    try:
        # A generated certificate past its date is made again by load_certificate.
        loaded = load_server_certificate(path, check_expiry=not generated)
    except CertificateProblem as error:
        raise ValueError(str(error)) from None
    return ManagerCertificate(
        options=server_options(loaded),
        fingerprint=loaded.fingerprint,
        subject=loaded.subject,
        not_after=loaded.not_after,
        generated=generated,
        loaded=loaded,
    )


def _names(address: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    hostname = socket.gethostname()
    if hostname and hostname != "localhost":
        names.append(x509.DNSName(hostname))
    addresses = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        configured: Optional[ipaddress._BaseAddress] = ipaddress.ip_address(address)
    except ValueError:
        configured = None
        if address:
            names.append(x509.DNSName(address))
    if configured is not None and not configured.is_unspecified:
        addresses.add(configured)
    names += [x509.IPAddress(item) for item in sorted(addresses, key=lambda item: (item.version, item))]
    return names


def _write_generated(path: str, address: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sftpauth"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"sftpauth Web Manager {socket.gethostname()}"[:64]),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_names(address)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    data = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, data)
