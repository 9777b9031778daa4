"""Server-side TLS (FTPS): the certificate of a service, its TLS contexts, its reload (on SIGHUP, :mod:`sftpauth.signals`).

``ssl_certificate`` is one PEM file holding the certificate, its private key
(unencrypted) and optionally the intermediate certificates. It is read at
start-up, where anything wrong with it is a configuration error, and again
on SIGHUP, where a file that cannot be used is logged and the certificate
in use is kept.

Each TLS *session* (one FTP control connection and its data connections)
gets its own OpenSSL context, built from the loaded certificate: TLS 1.2 or
later (up to ``maximum_version``), Twisted's default cipher suites (forward
secrecy, AEAD), its own session cache and its own session-ticket keys. So a data connection can
only resume a TLS session its own control connection established; that is
what ``ftps_require_session_reuse`` checks. (The LDAP client's TLS lives in
:mod:`sftpauth.auth.ldap.tls`.)
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any, Callable, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
EXPIRY_WARNING = datetime.timedelta(days=14)

_log = Logger()


class CertificateProblem(ValueError):
    """``ssl_certificate`` cannot be used; the message says why, without key material."""


@attrs.frozen
class ServerCertificate:
    """A certificate with its private key and chain (cryptography objects, as pyOpenSSL takes them)."""

    path: str
    pem: bytes = attrs.field(repr=False)  # the file as read: what a worker process is given (sftpauth.workers)
    private_key: Any = attrs.field(repr=False)
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    subject: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str  # SHA256 of the DER certificate, as "AB:CD:..."

    def describe(self) -> str:
        return f"{self.subject}, valid until {self.not_after:%Y-%m-%d %H:%M} UTC, SHA256 {self.fingerprint}"

    def date_problem(self, now: Optional[datetime.datetime] = None) -> str:
        """Why clients refuse this certificate now or soon, or "": not valid yet, expired, or expiring within
        :data:`EXPIRY_WARNING`. The caller adds what to do (send SIGHUP, restart)."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if self.not_before > now:
            return (
                f"the certificate in {self.path} is not valid before {self.not_before:%Y-%m-%d %H:%M} UTC: clients "
                "refuse it until then (check its dates, and this machine's clock)"
            )
        if self.not_after <= now:
            return f"the certificate in {self.path} expired on {self.not_after:%Y-%m-%d %H:%M} UTC: clients refuse it"
        if self.not_after - now < EXPIRY_WARNING:
            days = (self.not_after - now).days
            left = "in less than a day" if days == 0 else f"in {days} day{'s' if days > 1 else ''}"
            return f"the certificate in {self.path} expires on {self.not_after:%Y-%m-%d %H:%M} UTC, {left}"
        return ""


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_server_certificate(
    path: str, now: Optional[datetime.datetime] = None, check_expiry: bool = True
) -> ServerCertificate:
    """Read and check ``path``; :class:`CertificateProblem` when it cannot serve TLS.

    ``check_expiry = False`` loads an expired certificate, for callers that
    look at ``not_after`` themselves (a generated one is then made again).
    """
    try:
        with open(path, "rb") as pem_file:
            data = pem_file.read()
    except OSError as error:
        raise CertificateProblem(f"cannot read {path}: {error.strerror or error}") from None
    return parse_server_certificate(data, path, now, check_expiry)


def parse_server_certificate(
    data: bytes, path: str, now: Optional[datetime.datetime] = None, check_expiry: bool = True
) -> ServerCertificate:
    """:func:`load_server_certificate` of the PEM text ``data`` that ``path`` held (named in the messages)."""
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        if b"-----BEGIN CERTIFICATE-----" in data:
            raise CertificateProblem(
                f"a certificate in {path} cannot be read: it is cut short or damaged (compare the lines between "
                "-----BEGIN CERTIFICATE----- and -----END CERTIFICATE----- with the file you were given)"
            ) from None
        raise CertificateProblem(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateProblem(f"the private key in {path} is protected by a passphrase; give an unencrypted key") from None
    except (ValueError, crypto.Error):
        raise CertificateProblem(
            f"{path} holds no usable PEM private key: put the certificate and its key in one file"
        ) from None
    except Exception as error:  # cryptography.exceptions.UnsupportedAlgorithm
        raise CertificateProblem(f"the private key in {path} cannot be used: {type(error).__name__}") from None
    wanted = _public_der(key.public_key())
    leaves = [certificate for certificate in certificates if _public_der(certificate.public_key()) == wanted]
    if not leaves:
        raise CertificateProblem(f"the private key in {path} does not belong to any certificate of the file")
    leaf = leaves[0]
    chain = tuple(certificate for certificate in certificates if certificate is not leaf)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    not_after = leaf.not_valid_after_utc
    if check_expiry and not_after < now:
        raise CertificateProblem(f"the certificate in {path} expired on {not_after:%Y-%m-%d %H:%M} UTC")
    digest = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    try:
        loaded = ServerCertificate(
            path=path,
            pem=data,
            private_key=key,
            certificate=leaf,
            chain=chain,
            subject=leaf.subject.rfc4514_string() or "(empty subject)",
            not_before=leaf.not_valid_before_utc,
            not_after=not_after,
            fingerprint=":".join(digest[index : index + 2] for index in range(0, len(digest), 2)),
        )
        server_options(loaded).getContext()  # OpenSSL checks the key against the certificate
    except (TypeError, ValueError, crypto.Error, SSL.Error) as error:
        raise CertificateProblem(f"OpenSSL cannot use the certificate and key of {path}: {error}") from None
    return loaded


def server_options(certificate: ServerCertificate, maximum_version=None) -> ssl.CertificateOptions:
    return ssl.CertificateOptions(
        privateKey=certificate.private_key,
        certificate=certificate.certificate,
        extraCertChain=list(certificate.chain),
        raiseMinimumTo=MINIMUM_VERSION,
        lowerMaximumSecurityTo=maximum_version,
        enableSessions=True,
        enableSessionTickets=True,
    )


class ServerTLS:
    """The TLS side of one service: its current certificate and a context per session."""

    def __init__(self, path: str, service_id: str, maximum_version=None, certificate: Optional[ServerCertificate] = None):
        """``certificate``: the one to use, already loaded (a worker's, from its parent); else ``path`` is read."""
        self.path = path
        self.service_id = service_id
        self.maximum_version = maximum_version  # a twisted.internet.ssl.TLSVersion, None = the newest
        self.certificate = certificate if certificate is not None else load_server_certificate(path)

    def new_session(self) -> ssl.CertificateOptions:
        """Options (an ``IOpenSSLServerConnectionCreator``) with a context of their own.

        Use the same object for the control connection and every data
        connection of one FTP session: TLS sessions are resumable only
        within it.
        """
        return server_options(self.certificate, self.maximum_version)

    def reload(self) -> bool:
        """Read ``ssl_certificate`` again; new sessions use it. False (and the old one kept) on error."""
        try:
            certificate = load_server_certificate(self.path)
        except CertificateProblem as problem:
            _log.error(
                "service {service}: ssl_certificate not reloaded, the certificate in use is kept: {problem}",
                service=self.service_id,
                problem=str(problem),
            )
            return False
        self.certificate = certificate
        _log.info("service {service}: reloaded ssl_certificate: {certificate}", service=self.service_id, certificate=certificate.describe())
        self.check_dates()
        return True

    def use(self, certificate: ServerCertificate) -> None:
        """New sessions use ``certificate``: one the parent process reloaded, in a worker (no file is read)."""
        self.certificate = certificate
        _log.info("service {service}: using the reloaded ssl_certificate: {certificate}", service=self.service_id,
                  certificate=certificate.describe())

    def log_certificate(self) -> None:
        """At start-up; its date problems are configuration warnings then (``cli.check_files``)."""
        _log.info("service {service}: TLS certificate {certificate}", service=self.service_id, certificate=self.certificate.describe())

    def check_dates(self, now: Optional[datetime.datetime] = None) -> str:
        """Log (and return) the date problem of the certificate in use: after a reload, and once a day."""
        return log_date_problem(self.certificate, self.service_id, SIGHUP_ADVICE, now)


SIGHUP_ADVICE = "replace the file and send SIGHUP to sftpauth"


def log_date_problem(
    certificate: ServerCertificate, service_id: str, advice: str, now: Optional[datetime.datetime] = None
) -> str:
    """Log (and return) :meth:`ServerCertificate.date_problem` with what to do: an error once expired."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    problem = certificate.date_problem(now)
    if problem:
        (_log.error if certificate.not_after <= now else _log.warn)(
            "service {service}: {problem}; {advice}", service=service_id, problem=problem, advice=advice
        )
    return problem


class DailyDateCheck(Service):
    """Checks the dates of a certificate in use once a day, from a day after start-up.

    A server that runs for months must say when its certificate is about to
    expire, not only at start-up: ``check`` logs the problem
    (:meth:`ServerTLS.check_dates`).
    """

    INTERVAL = 24 * 3600

    def __init__(self, reactor, check: Callable[[], object]):
        self._call = LoopingCall(check)
        self._call.clock = reactor

    def startService(self) -> None:
        super().startService()
        # A check that raised would stop the loop: say so rather than leave an unhandled error.
        self._call.start(self.INTERVAL, now=False).addErrback(
            lambda failure: _log.failure("the daily certificate date check stopped", failure)
        )

    def stopService(self):
        if self._call.running:
            self._call.stop()
        return super().stopService()


def openssl_reason(error: BaseException) -> str:
    """OpenSSL's words for a failed handshake (``unsupported protocol``), without its library and function names."""
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        text = ", ".join(str(item[-1]) for item in error.args[0] if item and item[-1])
        if text:
            return text
    return str(error) or type(error).__name__


def handshake_finished(transport) -> bool:
    """Whether the TLS handshake of ``transport`` (one that has a pyOpenSSL handle) completed."""
    try:
        return transport.getHandle().get_finished() is not None
    except Exception:  # no TLS handle (any more)
        return False


def session_reused(connection: SSL.Connection) -> Optional[bool]:
    """Whether the handshake of ``connection`` resumed an earlier TLS session; None if unknown.

    pyOpenSSL has no public call for OpenSSL's ``SSL_session_reused``; the
    binding it is built on has it.
    """
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection._ssl))
    except (ImportError, AttributeError):  # pragma: no cover - another pyOpenSSL
        return None


def can_check_session_reuse() -> bool:
    try:
        from OpenSSL._util import lib
    except ImportError:  # pragma: no cover
        return False
    return hasattr(lib, "SSL_session_reused") and hasattr(SSL.Connection(SSL.Context(SSL.TLS_METHOD)), "_ssl")
