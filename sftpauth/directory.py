"""``type = ldap-directory``: the embedded demo directory (ldaptor in-memory).

It serves the LDAP protocol for real from an LDIF file, so the demo goes
through exactly the production LDAP code path. Read-only, passwords in
clear text or ``{SSHA}``: for demos and tests, never for production.
"""

from __future__ import annotations

import io

from ldaptor.inmemory import fromLDIFFile
from ldaptor.interfaces import IConnectedLDAPEntry
from ldaptor.protocols.ldap.ldapserver import LDAPServer
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.components import registerAdapter

from sftpauth.config.errors import ConfigError, ConfigProblem
from sftpauth.config.models import DirectoryServiceSettings
from sftpauth.listening import listening_service
from sftpauth.runtime import Runtime

_log = Logger()


class DirectoryFactory(ServerFactory):
    protocol = LDAPServer

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
