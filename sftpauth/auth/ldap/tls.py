"""TLS for LDAP connections: LDAPS and StartTLS with verified certificates.

Every handshake checks the certificate chain against the method's trust
(``tls_trusted_certificates``: the system store or a PEM bundle) and the
name in ``address`` with service-identity (DNS names and IP addresses),
TLS 1.2 or later. ``disable-identity-security`` turns both checks off; the
problems are still recorded, so verify-ldap can show what would be refused.

What a handshake saw goes into a :class:`TLSReport`, so a refused
certificate says why (expired, untrusted, name mismatch) in the log, the
login trace and verify-ldap, instead of OpenSSL's "certificate verify
failed".
"""

from __future__ import annotations

import datetime
import ipaddress
import warnings
from typing import Optional

import attrs
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from sftpauth.tls import openssl_reason

SYSTEM = "system"
DISABLED = "disable-identity-security"
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

_log = Logger()

# X509_V_ERR_* codes (openssl/x509_vfy.h) an administrator meets in practice.
_VERIFY_ERRORS = {
    2: ("untrusted", "the issuer certificate is not among the trusted certificates"),
    7: ("invalid", "the certificate signature is invalid"),
    9: ("not-yet-valid", "the certificate is not valid yet"),
    10: ("expired", "the certificate has expired"),
    18: ("untrusted", "the certificate is self-signed and not trusted"),
    19: ("untrusted", "the chain ends in a self-signed certificate that is not trusted"),
    20: ("untrusted", "the issuer is not trusted (unable to get the local issuer certificate)"),
    21: ("untrusted", "the certificate cannot be verified (no trusted issuer)"),
    23: ("revoked", "the certificate is revoked"),
    24: ("invalid", "an issuer in the chain is not a CA"),
    26: ("invalid", "the certificate may not be used for a TLS server"),
}


def load_certificate_bundle(path: str) -> list[x509.Certificate]:
    """The certificates of a PEM file; ValueError with a sentence when unusable."""
    try:
        with open(path, "rb") as bundle:
            data = bundle.read()
    except OSError as error:
        raise ValueError(f"cannot read {path!r}: {error.strerror}") from None
    try:
        with warnings.catch_warnings():
            # Debian's own bundle holds a CA whose serial number is not positive: cryptography warns on
            # stderr (check-config's output too) of a file the administrator does not write.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    return certificates


@attrs.frozen
class CertificateSummary:
    """What verify-ldap and the log say about a server certificate."""

    subject: str
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    names: tuple[str, ...]  # "DNS:ldap.example.com", "IP:192.0.2.1"

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> "CertificateSummary":
        try:
            extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(f"DNS:{name}" for name in extension.get_values_for_type(x509.DNSName)) + tuple(
                f"IP:{address}" for address in extension.get_values_for_type(x509.IPAddress)
            )
        except (x509.ExtensionNotFound, ValueError):
            names = ()
        return cls(
            subject=certificate.subject.rfc4514_string(),
            issuer=certificate.issuer.rfc4514_string(),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            names=names,
        )

    def expiry(self, now: Optional[datetime.datetime] = None) -> str:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        days = (self.not_after - now).days
        when = self.not_after.strftime("%Y-%m-%d %H:%M UTC")
        if self.not_after < now:
            return f"expired {when}"
        if self.not_before > now:
            return f"not valid before {self.not_before:%Y-%m-%d %H:%M UTC}"
        return f"expires {when} (in {days} days)"

    def describe(self) -> str:
        names = ", ".join(self.names) or "no subjectAltName"
        return f"subject {self.subject}; issuer {self.issuer}; {self.expiry()}; names {names}"


@attrs.define
class TLSReport:
    """One handshake: the server certificate, the first problem found, the outcome."""

    hostname: str
    verifying: bool
    certificate: Optional[CertificateSummary] = None
    problem_kind: str = ""  # expired, not-yet-valid, untrusted, name-mismatch, invalid, revoked
    problem: str = ""
    version: str = ""  # e.g. TLSv1.3, once the handshake is done
    name_checked: bool = False

    def record(self, kind: str, problem: str) -> None:
        if not self.problem:
            self.problem_kind, self.problem = kind, problem

    def outcome(self) -> str:
        """A sentence for a successful handshake (verify-ldap, test-login)."""
        if not self.verifying:
            warning = f"; would be refused: {self.problem}" if self.problem else ""
            return f"{self.version}, certificate NOT verified (disable-identity-security){warning}"
        return f"{self.version}, certificate verified, name {self.hostname} matches"


def _is_ip(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def check_name(certificate: x509.Certificate, hostname: str) -> Optional[str]:
    """None when ``certificate`` is valid for ``hostname``, else why not."""
    try:
        if _is_ip(hostname):
            verify_certificate_ip_address(certificate, hostname)
        else:
            verify_certificate_hostname(certificate, hostname)
    except (VerificationError, CertificateError):
        summary = CertificateSummary.from_certificate(certificate)
        names = ", ".join(summary.names) or f"no subjectAltName (subject {summary.subject})"
        return f"certificate name mismatch: it is for {names}, not {hostname}"
    return None


@implementer(IOpenSSLClientConnectionCreator)
class _ReportingCreator:
    """One TLS connection to ``hostname``, recording what it sees in ``report``."""

    def __init__(self, policy: "TLSPolicy", hostname: str, report: TLSReport):
        self._policy = policy
        self._hostname = hostname
        self._report = report

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._policy.context(), None)
        if not _is_ip(self._hostname):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT if self._policy.verifying else SSL.VERIFY_NONE
        connection.set_verify(mode, self._verify)
        return connection

    def _verify(self, connection, certificate: X509, error: int, depth: int, ok: int) -> bool:
        report = self._report
        try:
            cryptography_certificate = certificate.to_cryptography()
            if depth == 0 and report.certificate is None:
                report.certificate = CertificateSummary.from_certificate(cryptography_certificate)
            if not ok:
                kind, text = _VERIFY_ERRORS.get(error, ("invalid", f"OpenSSL verification error {error}"))
                if kind == "untrusted" and not self._policy.verifying:
                    return True  # nothing is trusted without verification: not worth a warning
                where = "" if depth == 0 else f" (chain certificate {CertificateSummary.from_certificate(cryptography_certificate).subject})"
                if kind == "expired":
                    text += f" on {cryptography_certificate.not_valid_after_utc:%Y-%m-%d %H:%M UTC}"
                report.record(kind, f"{text}{where}")
            elif depth == 0 and not report.name_checked:
                report.name_checked = True
                mismatch = check_name(cryptography_certificate, self._hostname)
                if mismatch is not None:
                    report.record("name-mismatch", mismatch)
                    ok = 0
        except Exception:  # an exception inside an OpenSSL callback would be lost
            _log.failure("while verifying the certificate of {host}", host=self._hostname)
            report.record("invalid", "the certificate could not be checked")
            ok = 0
        return bool(ok) or not self._policy.verifying


class TLSPolicy:
    """How one LDAP method secures its connections (one context for all its servers)."""

    def __init__(self, secure_connection: str, trust: str):
        self.secure_connection = secure_connection  # "no", "yes" (LDAPS) or "starttls"
        self.trust = trust
        self.verifying = trust != DISABLED
        self._context: Optional[SSL.Context] = None

    @property
    def enabled(self) -> bool:
        return self.secure_connection in ("yes", "starttls")

    def describe(self) -> str:
        mode = {"no": "plain LDAP", "yes": "LDAPS", "starttls": "StartTLS"}[self.secure_connection]
        if not self.enabled:
            return mode
        trust = {SYSTEM: "the system trust store", DISABLED: "NOT VERIFIED (disable-identity-security)"}.get(
            self.trust, self.trust
        )
        return f"{mode}, certificates: {trust}"

    def context(self) -> SSL.Context:
        """The OpenSSL context, built once (loading the system store or the bundle)."""
        if self._context is None:
            if self.verifying:
                if self.trust == SYSTEM:
                    trust_root = ssl.platformTrust()
                else:
                    trust_root = ssl.trustRootFromCertificates(
                        [ssl.Certificate(X509.from_cryptography(c)) for c in load_certificate_bundle(self.trust)]
                    )
                options = ssl.CertificateOptions(trustRoot=trust_root, raiseMinimumTo=MINIMUM_VERSION)
            else:
                options = ssl.CertificateOptions(verify=False, raiseMinimumTo=MINIMUM_VERSION)
            self._context = options.getContext()
        return self._context

    def creator(self, hostname: str, report: TLSReport) -> IOpenSSLClientConnectionCreator:
        return _ReportingCreator(self, hostname, report)

    def new_report(self, hostname: str) -> TLSReport:
        return TLSReport(hostname=hostname, verifying=self.verifying)


def describe_handshake_failure(report: Optional[TLSReport], reason: Exception) -> tuple[str, str]:
    """(kind, sentence) for a handshake that did not complete."""
    if report is not None and report.problem and report.verifying:
        return f"tls-{report.problem_kind}", f"TLS certificate refused: {report.problem}"
    if isinstance(reason, SSL.Error):
        return "tls-handshake", f"TLS handshake failed: {openssl_reason(reason)}"
    return "tls-handshake", "the server closed the connection during the TLS handshake"
