"""The validated configuration: frozen objects, built once at load.

Field names are the option names of configspec.ini, so one option lives in
two places only: its spec line (type, default) and its field here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attrs

from sftpauth.permissions import Permission

DEFAULT_AUTHENTICATION = "DEFAULT-AUTHENTICATION"
DEFAULT_GROUP = "DEFAULT_GROUP"
DEFAULT_SECURITY_POLICY = "DEFAULT-SECURITY-POLICY"


@attrs.frozen
class ServerSettings:
    name: str
    authentications: tuple[str, ...]
    audit_log: str
    data_folder: str
    state: str
    workers: int


@attrs.frozen
class ServiceSettings:
    """Options every [services/ID] has."""

    id: str
    type: str
    enabled: bool
    name: str
    address: str
    port: int
    authentications: tuple[str, ...]
    security_policy: str
    idle_connection_timeout: int
    maximum_concurrent_connections: int

    @property
    def title(self) -> str:
        return self.name or self.id


@attrs.frozen
class FTPServiceSettings(ServiceSettings):
    banner: str
    passive_port_range: Optional[tuple[int, int]]
    passive_address: str


@attrs.frozen
class SSHServiceSettings(ServiceSettings):
    ssh_server_keys: tuple[str, ...]
    sftp: bool


@attrs.frozen
class DirectoryServiceSettings(ServiceSettings):
    """The embedded demo LDAP directory (ldaptor in-memory)."""

    ldif: str


@attrs.frozen
class AuthenticationSettings:
    """Options every [authentications/ID] has."""

    id: str
    type: str
    name: str
    enabled: bool


@attrs.frozen
class ApplicationAuthenticationSettings(AuthenticationSettings):
    """The local [accounts/..] method."""


@attrs.frozen
class LDAPAuthenticationSettings(AuthenticationSettings):
    """[authentications/ID] type = ldap (SPEC §3)."""

    address: tuple[tuple[str, Optional[int]], ...]  # (host, port or None for `port`)
    port: int
    secure_connection: str
    timeout: int
    bind_dn_type: str
    bind_dn: tuple[Any, ...]  # ldaptor DistinguishedName objects
    username_attribute: str
    username_suffix: str
    service_account_dn: str
    service_account_password: str = attrs.field(repr=False)
    search_filter: Any  # ldaptor filter object or None
    manager_search_filter: Any
    home_folder_attribute: Any  # HomeFolderRule or None
    email_attribute: str
    full_name_attribute: str
    base_groups: tuple[str, ...]


@attrs.frozen
class GroupSettings:
    id: str
    name: str
    enabled: bool
    home_folder_path: str
    create_home_folder: bool
    lock_in_home_folder: str
    permissions: frozenset[Permission]


@attrs.frozen
class AccountSettings:
    id: str
    name: str
    enabled: bool
    password: str = attrs.field(repr=False)
    group: tuple[str, ...]
    home_folder_path: str

    @property
    def username(self) -> str:
        return self.name or self.id


@attrs.frozen
class Configuration:
    path: str
    server: ServerSettings
    services: Mapping[str, ServiceSettings]
    authentications: Mapping[str, AuthenticationSettings]
    groups: Mapping[str, GroupSettings]
    accounts: Mapping[str, AccountSettings]
    warnings: tuple = ()

    def authentications_for(self, service: ServiceSettings) -> tuple[str, ...]:
        """The ordered method IDs a service uses (its own list wins)."""
        return service.authentications or self.server.authentications


# Which model a section kind (and, for services/authentications, its type)
# is built into.
SERVICE_MODELS = {
    "ftp": FTPServiceSettings,
    "ssh": SSHServiceSettings,
    "sftp": SSHServiceSettings,
    "ldap-directory": DirectoryServiceSettings,
}
SERVICE_SPEC_KIND = {"ftp": "ftp", "ssh": "ssh", "sftp": "ssh", "ldap-directory": "ldap-directory"}
AUTHENTICATION_MODELS = {
    "application": ApplicationAuthenticationSettings,
    "ldap": LDAPAuthenticationSettings,
}
