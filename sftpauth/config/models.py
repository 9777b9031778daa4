"""The validated configuration: frozen objects, built once at load.

Field names are the option names of configspec.ini, so one option lives in
two places only: its spec line (type, default) and its field here.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from typing import Any, Iterable, Mapping, Optional

import attrs

from sftpauth.config.errors import ConfigProblem
from sftpauth.permissions import Permission

DEFAULT_AUTHENTICATION = "DEFAULT-AUTHENTICATION"
DEFAULT_GROUP = "DEFAULT_GROUP"
USER_MARKER = "${USER}"  # in a home_folder_path: the login name
DEFAULT_SECURITY_POLICY = "DEFAULT-SECURITY-POLICY"
DEFAULT_ROLE = "DEFAULT-ROLE"


def user_folder_problem(username: str) -> str:
    """Why ``username`` cannot stand for ``${USER}``, one folder name ("" when it can).

    ``.`` would make the folder of every user's home someone's home, ``a/b``
    a folder inside the home of ``a``.
    """
    if username in ("", ".", ".."):
        return "is not a folder name"
    if "/" in username:
        return "contains '/'"
    return ""


def local_account_key(username: str) -> str:
    """A name as local accounts are matched: exactly, except that a composed ``ü`` and a ``u`` with a
    combining diaeresis are one name (NFC): they look the same, and clients differ in what they send."""
    return unicodedata.normalize("NFC", username)


def host_port(host: str, port: int) -> str:
    """``host:port`` as logs, errors and pages write it: an IPv6 host in brackets (``[::1]:389``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_in(address: str, networks: Iterable[Any]) -> bool:
    """Whether the IP ``address`` (IPv4-mapped IPv6 counts as IPv4) is in one of ``networks``; never for "" or a name.

    For the source filters, ``trusted_proxies`` and ``proxy_protocol_sources``.
    """
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    if getattr(peer, "ipv4_mapped", None) is not None:
        peer = peer.ipv4_mapped
    return any(peer in network for network in networks if network.version == peer.version)


@attrs.frozen
class ServerSettings:
    name: str
    authentications: tuple[str, ...]
    audit_log: str
    data_folder: str
    state: str
    workers: int
    # ext: "auto": each worker process kept on one core (sftpauth.workers.pool); "no": left to the kernel
    worker_cpu_affinity: str = "auto"


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
    # ext: connections start with an HAProxy PROXY header (sftpauth.listening)
    proxy_protocol: bool = attrs.field(default=False, kw_only=True)
    # ext: the ipaddress networks of the proxies allowed to send it; () = any peer
    proxy_protocol_sources: tuple[Any, ...] = attrs.field(default=(), kw_only=True)

    def is_proxy_source(self, address: str) -> bool:
        return not self.proxy_protocol_sources or address_in(address, self.proxy_protocol_sources)

    @property
    def title(self) -> str:
        return self.name or self.id


@attrs.frozen
class FTPServiceSettings(ServiceSettings):
    """``type = ftp`` (explicit FTPS with a certificate) and ``type = ftpsi`` (implicit FTPS)."""

    banner: str
    passive_port_range: Optional[tuple[int, int]]
    passive_address: str
    ssl_certificate: str = ""  # PEM: certificate, chain and private key; "" = no FTPS
    ftps_explicit_enabled: bool = True
    ftps_force_secured_command_channel: bool = True
    ftps_force_secured_data_channel: bool = True
    ftps_require_session_reuse: bool = True

    @property
    def implicit_tls(self) -> bool:
        return self.type == "ftpsi"


@attrs.frozen
class SSHServiceSettings(ServiceSettings):
    ssh_server_keys: tuple[str, ...]
    sftp: bool
    keyboard_interactive_message: str = "Password:"


@attrs.frozen
class ManagerServiceSettings(ServiceSettings):
    """The Web Manager over HTTPS (sftpauth.manager)."""

    ssl_certificate: str  # PEM with certificate and key; "" = generated, self-signed
    header_authentication: bool
    trusted_proxies: tuple[Any, ...]  # ipaddress networks allowed to send preauth-* headers
    header_authentication_role: str
    metrics_require_login: bool
    session_idle_timeout: int
    session_lifetime: int  # seconds from the login to the end of a session, used or not
    request_timeout: int  # seconds from a request's first byte (a connection's start) to its last

    def is_trusted_proxy(self, address: str) -> bool:
        return address_in(address, self.trusted_proxies)


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
    secure_connection: str  # "no", "yes" (LDAPS) or "starttls"
    tls_trusted_certificates: str  # "system", "disable-identity-security" or a PEM bundle path
    timeout: int
    retry_interval: int
    connection_pool_size: int
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
    group_mapping: Any  # sftpauth.auth.ldap.groups.GroupMapping or None
    roles_mapping: Any  # GroupMapping of role IDs or None
    group_search_base: str
    group_search_filter: Any  # sftpauth.auth.ldap.groups.FilterTemplate or None
    nested_groups: bool
    extension_entry_point: Any  # sftpauth.auth.ldap.extensions.ExtensionEntryPoint or None
    extension_configuration: Mapping[str, Any]  # the JSON object, {} when empty


@attrs.frozen
class GroupSettings:
    id: str
    name: str
    enabled: bool
    home_folder_path: str
    create_home_folder: bool
    lock_in_home_folder: str
    permissions: frozenset[Permission]
    external_groups_association: tuple[str, ...] = ()  # normalised, lower-case DNs


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
class AdministratorSettings:
    """[administrators/ID]: a local Web Manager login (never a file transfer one)."""

    id: str
    name: str
    enabled: bool
    password: str = attrs.field(repr=False)
    roles: tuple[str, ...]

    @property
    def username(self) -> str:
        return self.name or self.id


@attrs.frozen
class RoleSettings:
    """[roles/ID]: what a Web Manager administrator with this role may do."""

    id: str
    name: str
    permissions: frozenset[str]  # {"all"} or a subset of configuration, read, write
    enabled: bool = True  # SFTPPlus: no administrator holding a disabled role may log in
    # SFTPPlus: ipaddress networks a Web Manager login holding this role may come from; empty: every address
    source_ip_filter: tuple[Any, ...] = ()

    @property
    def read_only(self) -> bool:
        return "all" not in self.permissions and "write" not in self.permissions


@attrs.frozen
class SecurityPolicySettings:
    """[security-policies/ID]: bans, denied usernames and source filters (sftpauth.auth.policy)."""

    id: str
    name: str
    source_ip_ban_after_count: int  # 0: never ban
    source_ip_ban_interval: int  # seconds
    deny_usernames: tuple[Any, ...]  # sftpauth.matching.MatchingExpression objects
    deny_administrators: tuple[Any, ...]
    source_ip_filter: tuple[Any, ...]  # ipaddress networks; empty: every address
    # ext: open connections of one address at once, per process; 0: no limit
    maximum_connections_per_address: int = 0


@attrs.frozen
class Configuration:
    path: str
    server: ServerSettings
    services: Mapping[str, ServiceSettings]
    authentications: Mapping[str, AuthenticationSettings]
    groups: Mapping[str, GroupSettings]
    accounts: Mapping[str, AccountSettings]
    warnings: tuple = ()
    roles: Mapping[str, "RoleSettings"] = attrs.Factory(dict)
    administrators: Mapping[str, "AdministratorSettings"] = attrs.Factory(dict)
    security_policies: Mapping[str, "SecurityPolicySettings"] = attrs.Factory(dict)
    # The line of each (section, option) and each (section, None) in the file.
    lines: Mapping[tuple, int] = attrs.field(factory=dict, repr=False, eq=False)

    def locate(self, problems: Iterable[ConfigProblem]) -> tuple[ConfigProblem, ...]:
        """Problems found after loading (services reading their files), with the line of their option."""
        located = []
        for problem in problems:
            if problem.line is None and problem.path == self.path and problem.section is not None:
                line = self.lines.get((problem.section, problem.option)) or self.lines.get((problem.section, None))
                problem = attrs.evolve(problem, line=line)
            located.append(problem)
        return tuple(located)

    def roles_of(self, role_ids: Iterable[str]) -> tuple[str, ...]:
        """The defined roles among ``role_ids``, in order; DEFAULT-ROLE when none is."""
        known = tuple(role_id for role_id in dict.fromkeys(role_ids) if role_id in self.roles)
        if not known and DEFAULT_ROLE in self.roles:
            return (DEFAULT_ROLE,)
        return known

    def serves_nobody(self) -> Optional[str]:
        """What check-config and start-up warn when no service takes logins (an empty or all-disabled file)."""
        if any(service.enabled and service.type != "ldap-directory" for service in self.services.values()):
            return None
        return (f"{self.path}: no FTP, FTPS, SFTP or Web Manager service is enabled, so sftpauth listens for "
                "nobody (add a [services/ID] section, or set enabled = yes)")

    def authentications_for(self, service: ServiceSettings) -> tuple[str, ...]:
        """The ordered method IDs a service uses (its own list wins).

        A Web Manager service without its own list tries the local
        [administrators/..] (DEFAULT-AUTHENTICATION) first, then the server's list.
        """
        if service.authentications:
            return service.authentications
        if service.type == "manager":
            others = tuple(method for method in self.server.authentications if method != DEFAULT_AUTHENTICATION)
            return (DEFAULT_AUTHENTICATION,) + others
        return self.server.authentications


# Which model a section kind (and, for services/authentications, its type)
# is built into.
SERVICE_MODELS = {
    "ftp": FTPServiceSettings,
    "ftpsi": FTPServiceSettings,
    "ssh": SSHServiceSettings,
    "sftp": SSHServiceSettings,
    "manager": ManagerServiceSettings,
    "ldap-directory": DirectoryServiceSettings,
}
SERVICE_SPEC_KIND = {
    "ftp": "ftp",
    "ftpsi": "ftp",
    "ssh": "ssh",
    "sftp": "ssh",
    "manager": "manager",
    "ldap-directory": "ldap-directory",
}
AUTHENTICATION_MODELS = {
    "application": ApplicationAuthenticationSettings,
    "ldap": LDAPAuthenticationSettings,
}
