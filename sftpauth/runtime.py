"""What every service of one process shares."""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.cred.portal import Portal
from twisted.internet import defer

from sftpauth.audit import AuditLog
from sftpauth.auth.chain import AuthenticationChain
from sftpauth.config.models import Configuration


@attrs.frozen
class Runtime:
    configuration: Configuration
    reactor: object
    portal: Portal
    chain: AuthenticationChain
    audit: AuditLog
    run_in_thread: Callable[..., defer.Deferred]
    data_folder: str  # generated host keys and certificates live here
