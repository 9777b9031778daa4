"""``sftpauth verify-ldap``: check every server of every LDAP method, step by step.

For each address: the TCP connection, StartTLS when configured, the TLS
handshake and certificate (subject, issuer, expiry, host name), the root
DSE, the service-account BIND (or anonymous access) and a search under
each ``bind_dn``. Every failure comes with a hint an administrator can act
on: a wrong port for LDAPS, a certificate for another name, a bad service
password, a base DN that does not exist. It uses the same
:class:`~.client.Connector` as logins, so what it checks is what logins do.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs
from ldaptor.protocols import pureldap
from twisted.internet import defer

from sftpauth.auth.ldap import client as ldap
from sftpauth.auth.ldap.client import ConnectProgress, Connector, LDAPConnection, LDAPUnavailable, ServerAddress
from sftpauth.auth.ldap.dn import OPERATIONS_ERROR, describe
from sftpauth.auth.ldap.tls import DISABLED, SYSTEM, TLSPolicy, TLSReport
from sftpauth.config.models import LDAPAuthenticationSettings

OK = "ok"
FAIL = "FAIL"
WARN = "warn"
INFO = "info"

_NAMING_CONTEXTS = "namingContexts"
# An anonymous search refused for want of a BIND: AD answers operationsError "00002020: Operation
# unavailable without authentication"; others insufficientAccess.
_ANONYMOUS_REFUSED = (OPERATIONS_ERROR, ldap.INSUFFICIENT_ACCESS)


@attrs.frozen
class Check:
    """One line of the report."""

    server: str
    step: str  # tcp, starttls, tls, certificate, ldap, bind, search
    status: str  # ok, FAIL, warn, info
    detail: str
    hint: str = ""


@attrs.frozen
class MethodReport:
    method_id: str
    title: str
    checks: tuple[Check, ...]

    @property
    def failures(self) -> int:
        return sum(1 for check in self.checks if check.status == FAIL)


def _ms(seconds: Optional[float]) -> str:
    return f"{(seconds or 0) * 1000:.1f} ms"


def _title(settings: LDAPAuthenticationSettings, tls: TLSPolicy) -> str:
    name = f" ({settings.name})" if settings.name else ""
    disabled = " [disabled]" if not settings.enabled else ""
    return f"[authentications/{settings.id}]{name}{disabled}: {tls.describe()}; timeout {settings.timeout}s"


async def verify_method(settings: LDAPAuthenticationSettings, reactor) -> MethodReport:
    """Check every address of one method (concurrently); the report keeps their order."""
    tls = TLSPolicy(settings.secure_connection, settings.tls_trusted_certificates)
    connector = Connector(reactor, settings.timeout, tls)
    addresses = [ServerAddress(host, port or settings.port) for host, port in settings.address]
    results = await defer.gatherResults(
        [defer.ensureDeferred(verify_server(settings, connector, address)) for address in addresses],
        consumeErrors=True,
    )
    checks = tuple(check for result in results for check in result)
    return MethodReport(settings.id, _title(settings, tls), checks)


async def verify_server(settings: LDAPAuthenticationSettings, connector: Connector, address: ServerAddress) -> list[Check]:
    progress = ConnectProgress()
    try:
        connection = await connector.open(address, progress=progress)
    except LDAPUnavailable as error:
        return _connection_checks(settings, connector, address, progress, error)
    checks = _connection_checks(settings, connector, address, progress, None)
    try:
        checks += await _directory_checks(settings, connection, address)
    except LDAPUnavailable as error:
        hint = ""
        if not connector.tls.enabled and error.kind == "lost":
            hint = "the server closed the connection: if this port expects LDAPS (usually 636), set secure_connection = yes"
        elif error.kind == "timeout":
            hint = f"the server accepted the connection but did not answer within {settings.timeout}s"
        checks.append(Check(str(address), "ldap", FAIL, error.reason, hint))
    finally:
        connection.close()
    return checks


def _connection_checks(
    settings: LDAPAuthenticationSettings,
    connector: Connector,
    address: ServerAddress,
    progress: ConnectProgress,
    error: Optional[LDAPUnavailable],
) -> list[Check]:
    server = str(address)
    if progress.tcp_seconds is None:
        assert error is not None
        hints = {
            "refused": f"nothing listens on {address}: is the server running, is the port right (389 LDAP, 636 LDAPS)?",
            "timeout": f"no answer within {settings.timeout}s: a firewall dropping packets, a wrong address, or a server that hangs",
            "dns": f"the host name {address.host!r} does not resolve: check address",
        }
        return [Check(server, "tcp", FAIL, error.reason, hints.get(error.kind, ""))]
    checks = [Check(server, "tcp", OK, f"connected in {_ms(progress.tcp_seconds)}")]
    tls = connector.tls
    if not tls.enabled:
        if error is not None:  # pragma: no cover - plain connections fail only at TCP
            checks.append(Check(server, "ldap", FAIL, error.reason))
        return checks
    if tls.secure_connection == "starttls":
        if progress.starttls:
            checks.append(Check(server, "starttls", OK, "the server accepted StartTLS"))
        else:
            assert error is not None
            hint = ""
            if error.kind == "starttls-refused":
                hint = (
                    "the server does not offer StartTLS (no certificate configured?): configure TLS on the server, "
                    "or use secure_connection = yes with its LDAPS port; sftpauth never falls back to plain text"
                )
            elif error.kind == "lost":
                hint = "the server closed the connection: if this port expects LDAPS, use secure_connection = yes"
            elif error.kind == "timeout":
                hint = "no answer to StartTLS: if this port expects LDAPS, use secure_connection = yes"
            checks.append(Check(server, "starttls", FAIL, error.reason, hint))
            return checks
    report = progress.tls
    assert report is not None
    if error is None:
        checks.append(Check(server, "tls", OK, f"handshake {report.version} in {_ms(progress.ready_seconds)}"))
        checks += _certificate_checks(server, report, tls)
        return checks
    checks.append(Check(server, "tls", FAIL, error.reason, _tls_hint(error, report, tls, address)))
    if report.certificate is not None:
        checks.append(Check(server, "certificate", INFO, report.certificate.describe()))
    return checks


def _certificate_checks(server: str, report: TLSReport, tls: TLSPolicy) -> list[Check]:
    summary = report.certificate.describe() if report.certificate is not None else "no certificate details"
    if report.verifying:
        return [Check(server, "certificate", OK, f"{summary}; trusted, name {report.hostname} matches")]
    checks = [
        Check(
            server,
            "certificate",
            WARN,
            f"{summary}; NOT VERIFIED (tls_trusted_certificates = {DISABLED})",
            "anyone on the network path could impersonate this server: set tls_trusted_certificates to a PEM bundle",
        )
    ]
    if report.problem:
        checks.append(Check(server, "certificate", WARN, f"would be refused with verification: {report.problem}"))
    return checks


def _tls_hint(error: LDAPUnavailable, report: TLSReport, tls: TLSPolicy, address: ServerAddress) -> str:
    certificate = report.certificate
    if error.kind == "tls-name-mismatch":
        if certificate is not None and not certificate.names:
            # service-identity checks subjectAltName only: a CN-only certificate matches no name at all.
            return (
                f"certificate name mismatch: the certificate has no subjectAltName (subject {certificate.subject}), "
                f"so no address can match it: reissue it with subjectAltName {address.host}"
            )
        names = ", ".join(certificate.names) if certificate else "other names"
        return (
            f"certificate name mismatch: write in address a name the certificate has ({names}), "
            f"or reissue the certificate with {address.host}"
        )
    if error.kind == "tls-expired":
        return "the server certificate has expired: renew it on the server"
    if error.kind == "tls-not-yet-valid":
        return "the certificate is not valid yet: check the clocks of both machines"
    if error.kind == "tls-untrusted":
        issuer = f" ({certificate.issuer})" if certificate else ""
        where = "the system trust store" if tls.trust == SYSTEM else tls.trust
        return (
            f"the issuing CA{issuer} is not trusted by {where}: put that CA certificate in a PEM file "
            "and set tls_trusted_certificates to its path"
        )
    if error.kind == "tls-handshake" or (error.kind == "timeout" and tls.secure_connection == "yes"):
        if tls.secure_connection == "yes":
            return (
                f"{address} does not speak TLS: wrong port for LDAPS (usually 636), "
                "or use secure_connection = starttls on the plain LDAP port (389)"
            )
        return "the TLS handshake failed after StartTLS: check the server's TLS configuration"
    return ""


async def _directory_checks(
    settings: LDAPAuthenticationSettings, connection: LDAPConnection, address: ServerAddress
) -> list[Check]:
    server = str(address)
    checks = []
    result, entries = await connection.search(
        "", pureldap.LDAP_SCOPE_baseObject, pureldap.LDAPFilter_present("objectClass"), (_NAMING_CONTEXTS,)
    )
    contexts: Sequence[str] = entries[0].get(_NAMING_CONTEXTS) if entries else ()
    if result.ok:
        holds = f"; naming contexts: {', '.join(contexts)}" if contexts else ""
        checks.append(Check(server, "ldap", OK, f"root DSE read{holds}"))
    else:
        checks.append(Check(server, "ldap", WARN, f"root DSE: {describe(result)}"))

    if settings.service_account_dn:
        bind = await connection.bind(settings.service_account_dn, settings.service_account_password)
        if bind.ok:
            checks.append(Check(server, "bind", OK, f"service account {settings.service_account_dn}"))
        else:
            checks.append(
                Check(server, "bind", FAIL, f"service account {settings.service_account_dn}: {describe(bind)}", _bind_hint(bind))
            )
            return checks
    else:
        checks.append(Check(server, "bind", OK, "anonymous (no service_account_dn)"))

    attribute = settings.username_attribute
    for base in settings.bind_dn:
        base_text = base.getText()
        result, found = await connection.search(
            base_text, pureldap.LDAP_SCOPE_wholeSubtree, pureldap.LDAPFilter_present(attribute), (), size_limit=1
        )
        if found:
            checks.append(Check(server, "search", OK, f"under {base_text}: entries with {attribute} (e.g. {found[0].dn})"))
        elif result.code == ldap.NO_SUCH_OBJECT:
            known = f"; the server holds {', '.join(contexts)}" if contexts else ""
            matched = f" (it has {result.matched_dn})" if result.matched_dn else ""
            checks.append(
                Check(
                    server,
                    "search",
                    FAIL,
                    f"under {base_text}: {describe(result)}",
                    f"the base DN does not exist{matched}, or the service account may not see it: check bind_dn{known}",
                )
            )
        elif result.ok or result.code == ldap.SIZE_LIMIT_EXCEEDED:
            checks.append(
                Check(
                    server,
                    "search",
                    WARN,
                    f"under {base_text}: no entry with {attribute}",
                    "check username_attribute, or whether the service account may read these entries",
                )
            )
        elif not settings.service_account_dn and settings.bind_dn_type != "search" and result.code in _ANONYMOUS_REFUSED:
            # Logins of this bind_dn_type read entries as the user who logs in, never anonymously.
            checks.append(
                Check(
                    server,
                    "search",
                    INFO,
                    f"under {base_text}: the directory refuses anonymous searches ({describe(result)})",
                    f"not a problem: bind_dn_type = {settings.bind_dn_type} searches as the user who logs in; "
                    "set service_account_dn to have verify-ldap check the base DNs",
                )
            )
        else:
            checks.append(Check(server, "search", FAIL, f"under {base_text}: {describe(result)}"))
    if not settings.bind_dn:
        checks.append(Check(server, "search", OK, f"no bind_dn to search (bind_dn_type = {settings.bind_dn_type})"))
    return checks


def _bind_hint(result: ldap.LDAPResult) -> str:
    if result.code == ldap.INVALID_CREDENTIALS:
        return "bad service password (service_account_password), or service_account_dn does not exist"
    if result.code == ldap.NO_SUCH_OBJECT:
        return "service_account_dn does not exist"
    if result.code == ldap.CONFIDENTIALITY_REQUIRED:
        return "the server wants TLS before a BIND: set secure_connection = starttls (or yes with the LDAPS port)"
    if result.code == ldap.UNWILLING_TO_PERFORM:
        return "the server refuses this BIND (an empty password, a disabled account, or TLS required)"
    return ""


def format_report(path: str, reports: Sequence[MethodReport]) -> str:
    """The readable table printed by ``sftpauth verify-ldap``."""
    lines = [f"verify-ldap {path}"]
    headers = ("SERVER", "CHECK", "RESULT", "DETAIL")
    for report in reports:
        lines.append("")
        lines.append(report.title)
        rows = [(check.server, check.step, check.status, check.detail) for check in report.checks]
        widths = [max(len(row[index]) for row in [headers, *rows]) for index in range(3)]
        lines.append("  " + "  ".join(header.ljust(width) for header, width in zip(headers, widths)) + "  DETAIL")
        previous = None
        for check in report.checks:
            server = check.server if check.server != previous else ""
            previous = check.server
            cells = (server, check.step, check.status)
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + "  " + check.detail)
            if check.hint:
                lines.append("  " + " " * (sum(widths) + 6) + "hint: " + check.hint)
    failures = sum(report.failures for report in reports)
    servers = sum(len({check.server for check in report.checks}) for report in reports)
    lines.append("")
    if failures:
        lines.append(f"result: {failures} check(s) FAILED on {servers} server(s) of {len(reports)} LDAP method(s)")
    else:
        lines.append(f"result: every check passed on {servers} server(s) of {len(reports)} LDAP method(s)")
    return "\n".join(lines)
