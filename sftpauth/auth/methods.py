"""Build the configured authentication methods, one object per enabled section."""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer

from sftpauth.auth.administrators import LocalMethod
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.config.models import ApplicationAuthenticationSettings, Configuration, LDAPAuthenticationSettings
from sftpauth.state import SharedState


def build_methods(
    configuration: Configuration,
    run_in_thread: Callable[..., defer.Deferred],
    reactor,
    state: Optional[SharedState] = None,
) -> dict:
    """``state``: shared by every method and service (used TOTP codes); one per method when None."""
    methods = {}
    for method_id, settings in configuration.authentications.items():
        if not settings.enabled:
            continue
        if isinstance(settings, ApplicationAuthenticationSettings):
            # [accounts/..] for file transfer, [administrators/..] for the Web Manager only
            methods[method_id] = LocalMethod(settings, configuration, run_in_thread)
        elif isinstance(settings, LDAPAuthenticationSettings):
            methods[method_id] = LDAPMethod(settings, configuration, reactor, state=state)
        else:  # pragma: no cover - the configspec only admits known types
            raise ValueError(f"unknown authentication type {settings.type!r}")
    return methods


def ldap_pools(methods: dict) -> dict:
    """The LDAP server pools of built methods, by method ID (health, probes)."""
    return {method_id: method.pool for method_id, method in methods.items() if isinstance(method, LDAPMethod)}
