"""Build the configured authentication methods, one object per enabled section."""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from sftpauth.auth.application import ApplicationMethod
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.config.models import ApplicationAuthenticationSettings, Configuration, LDAPAuthenticationSettings


def build_methods(configuration: Configuration, run_in_thread: Callable[..., defer.Deferred], reactor) -> dict:
    methods = {}
    for method_id, settings in configuration.authentications.items():
        if not settings.enabled:
            continue
        if isinstance(settings, ApplicationAuthenticationSettings):
            methods[method_id] = ApplicationMethod(settings, configuration, run_in_thread)
        elif isinstance(settings, LDAPAuthenticationSettings):
            methods[method_id] = LDAPMethod(settings, configuration, reactor)
        else:  # pragma: no cover - the configspec only admits known types
            raise ValueError(f"unknown authentication type {settings.type!r}")
    return methods
