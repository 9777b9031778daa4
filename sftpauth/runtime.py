"""What every service of one process shares."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs
from twisted.cred.portal import Portal
from twisted.internet import defer

from sftpauth.audit import AuditLog
from sftpauth.auth.chain import AuthenticationChain
from sftpauth.config.models import Configuration
from sftpauth.state import SharedState


@attrs.frozen
class Runtime:
    configuration: Configuration
    reactor: object
    portal: Portal
    chain: AuthenticationChain
    audit: AuditLog
    run_in_thread: Callable[..., defer.Deferred]
    data_folder: str  # generated host keys and certificates live here
    state: SharedState  # used TOTP codes, shared by every service ([server] state)
    # LDAP server pools by method ID: server health for test-login, the dashboard and /health
    ldap_pools: Mapping[str, Any] = attrs.field(factory=dict, kw_only=True)
    # sftpauth.auth.policy.SecurityPolicies: bans and filters of the chain and the listening sockets
    policies: Any = attrs.field(default=None, kw_only=True)
    # SSH host keys (by SSH key type) by service ID, when this process was given them: a worker gets
    # its parent's, loaded once at the start; a service not in it loads its own (ssh.load_host_keys).
    host_keys: Mapping[str, Mapping[bytes, Any]] = attrs.field(factory=dict, kw_only=True)
    # FTPS certificates (sftpauth.tls.ServerTLS) by service ID, when this process was given them: a
    # worker's, from its parent, which also gives it the one it reloads on SIGHUP.
    tls: Mapping[str, Any] = attrs.field(factory=dict, kw_only=True)

    def policy_for(self, settings: Any) -> Any:
        """The SecurityPolicy of a service's settings (for its listening socket), None without policies."""
        if self.policies is None:
            return None
        return self.policies.for_service(settings.id)
