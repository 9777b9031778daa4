"""``type = ldap-directory``: the embedded demo directory (ldaptor in-memory).

It serves the LDAP protocol for real from an LDIF file, so the demo goes
through exactly the production LDAP code path. Read-only, passwords in
clear text or ``{SSHA}``: for demos and tests, never for production.
"""

from __future__ import annotations

import io

from ldaptor.inmemory import fromLDIFFile
from ldaptor.interfaces import IConnectedLDAPEntry
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldaperrors
from ldaptor.protocols.ldap.ldapserver import LDAPServer
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.components import registerAdapter

from sftpauth.auth.ldap.wire import LDAP_DECODER, MessageBuffer, NotLDAP
from sftpauth.config.errors import ConfigError, ConfigProblem
from sftpauth.config.models import DirectoryServiceSettings
from sftpauth.listening import listening_service
from sftpauth.runtime import Runtime

_log = Logger()


class DirectoryProtocol(LDAPServer):
    """ldaptor's LDAP server, closing a connection that sends what is not LDAP.

    On bytes it cannot decode (a TLS ClientHello from a client set to LDAPS,
    a port scanner) ldaptor printed a 2 KB repr of its decoder to stdout,
    skipped them and waited, so the client waited for its timeout. Now: one
    short line, and the connection is closed. ldaptor's own loop otherwise.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self._messages = MessageBuffer()

    def dataReceived(self, recd: bytes) -> None:
        self._messages.feed(recd)
        while self.connected:
            try:
                message = self._messages.next(LDAP_DECODER)
            except NotLDAP as error:
                self._notLDAP(str(error))
                return
            if message is None:
                return
            self.handle(message)

    def handle_LDAPExtendedRequest(self, request, controls, reply):
        """StartTLS is refused (protocolError, RFC 4511 4.14.2) with one info line; other extended requests as ldaptor."""
        oid = pureldap.LDAPStartTLSRequest.oid
        if request.requestName not in (oid, oid.decode("ascii")):
            return super().handle_LDAPExtendedRequest(request, controls, reply)
        peer = self.transport.getPeer()
        _log.info(
            "embedded LDAP directory: refused StartTLS from {host} (a client set to secure_connection = starttls? "
            "the demo directory speaks plain LDAP only)",
            host=getattr(peer, "host", "?"),
        )
        return pureldap.LDAPExtendedResponse(
            resultCode=ldaperrors.LDAPProtocolError.resultCode,
            errorMessage="StartTLS is not supported: the embedded demo directory speaks plain LDAP only",
            responseName=oid,
        )

    def _notLDAP(self, why: str) -> None:
        peer = self.transport.getPeer()
        _log.info(
            "embedded LDAP directory: closed a connection from {host} that sent something that is not LDAP "
            "({why}; a client set to LDAPS or StartTLS? the demo directory speaks plain LDAP only)",
            host=getattr(peer, "host", "?"),
            why=why,
        )
        self._messages.clear()
        self.transport.loseConnection()


class DirectoryFactory(ServerFactory):
    protocol = DirectoryProtocol
    noisy = False  # the port's "starting on" line says it; no "Starting factory <... at 0x...>" beside it

    def __init__(self, root):
        self.root = root


registerAdapter(lambda factory: factory.root, DirectoryFactory, IConnectedLDAPEntry)


def load_directory(settings: DirectoryServiceSettings, configuration_path: str):
    """The directory tree of the LDIF file; a bad file is a configuration error."""

    def problem(message: str) -> ConfigError:
        return ConfigError([ConfigProblem(configuration_path, None, f"services/{settings.id}", "ldif", message)])

    try:
        with open(settings.ldif, "rb") as ldif:
            data = ldif.read()
    except OSError as error:
        raise problem(f"cannot read {settings.ldif!r}: {error.strerror}") from None
    # ldaptor's parser only ends the last entry at a blank line.
    data = data.rstrip(b"\r\n") + b"\n\n"
    try:
        loading = fromLDIFFile(io.BytesIO(data))
    except Exception as error:
        raise problem(f"{settings.ldif!r} is not valid LDIF: {error}") from None
    result = []
    loading.addBoth(result.append)
    if not result:  # pragma: no cover - in-memory loading is synchronous
        raise problem(f"{settings.ldif!r} did not load")
    outcome = result[0]
    if hasattr(outcome, "getErrorMessage"):
        raise problem(f"{settings.ldif!r} is not valid LDIF: {outcome.getErrorMessage()}")
    return outcome


def make_service(settings: DirectoryServiceSettings, runtime: Runtime):
    root = load_directory(settings, runtime.configuration.path)
    _log.info(
        "embedded LDAP directory {service} serves {base} from {ldif} (demo use only)",
        service=settings.id,
        base=root.dn.getText(),
        ldif=settings.ldif,
    )
    return listening_service(runtime.reactor, settings, DirectoryFactory(root))
