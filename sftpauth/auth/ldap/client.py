"""Connections to LDAP servers: one per login, closed with UNBIND.

:class:`LDAPServerPool` is the interface the method uses; it tries the
configured addresses in order, so a server that does not answer costs at
most one ``timeout`` before the next is tried.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import attrs
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet import defer, error as net_error
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.logger import Logger

_log = Logger()

# LDAP result codes used by the method (RFC 4511 §4.1.9).
SUCCESS = 0
NO_SUCH_OBJECT = 32
INVALID_CREDENTIALS = 49
INSUFFICIENT_ACCESS = 50
UNWILLING_TO_PERFORM = 53


@attrs.frozen
class ServerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class LDAPUnavailable(Exception):
    """No configured server could be reached, or one stopped answering."""


@attrs.frozen
class LDAPResult:
    code: int
    message: str
    matched_dn: str = ""

    @property
    def ok(self) -> bool:
        return self.code == SUCCESS


@attrs.frozen
class Entry:
    """A search result: its DN and attributes (lower-case names, text values)."""

    dn: str
    attributes: dict[str, tuple[str, ...]]

    def get(self, name: str) -> tuple[str, ...]:
        return self.attributes.get(name.lower(), ())


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class LDAPConnection:
    """One connected client; every operation is bounded by ``timeout``."""

    def __init__(self, client: LDAPClient, server: ServerAddress, reactor, timeout: float):
        self.client = client
        self.server = server
        self._reactor = reactor
        self._timeout = timeout

    def _bounded(self, deferred: defer.Deferred) -> defer.Deferred:
        deferred.addTimeout(self._timeout, self._reactor)

        def unavailable(failure):
            failure.trap(defer.TimeoutError, defer.CancelledError, net_error.ConnectionLost, net_error.ConnectionDone)
            raise LDAPUnavailable(f"{self.server}: no answer within {self._timeout:g}s or connection lost")

        return deferred.addErrback(unavailable)

    async def bind(self, dn: str, password: str) -> LDAPResult:
        if not self.client.connected:
            raise LDAPUnavailable(f"{self.server}: connection lost")
        request = pureldap.LDAPBindRequest(dn=dn, auth=password.encode("utf-8"))
        response = await self._bounded(self.client.send(request))
        return LDAPResult(response.resultCode, _text(response.errorMessage or b""), _text(response.matchedDN or b""))

    async def search(
        self,
        base: str,
        scope: int,
        filter_object,
        attributes: Sequence[str],
        size_limit: int = 0,
    ) -> tuple[LDAPResult, list[Entry]]:
        if not self.client.connected:
            raise LDAPUnavailable(f"{self.server}: connection lost")
        entries: list[Entry] = []
        done: defer.Deferred = defer.Deferred()

        def handle(message) -> bool:
            if isinstance(message, pureldap.LDAPSearchResultEntry):
                attributes_found = {
                    _text(name).lower(): tuple(_text(value) for value in values)
                    for name, values in message.attributes
                }
                entries.append(Entry(_text(message.objectName), attributes_found))
                return False
            if isinstance(message, pureldap.LDAPSearchResultDone):
                done.callback(LDAPResult(message.resultCode, _text(message.errorMessage or b"")))
                return True
            return False  # references are not chased

        request = pureldap.LDAPSearchRequest(
            baseObject=base,
            scope=scope,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=size_limit,
            timeLimit=int(self._timeout),
            typesOnly=0,
            filter=filter_object,
            attributes=list(attributes) or ["1.1"],
        )
        self.client.send_multiResponse(request, handle)
        result = await self._bounded(done)
        return result, entries

    def close(self) -> None:
        """UNBIND and close; safe to call twice or on a lost connection."""
        if self.client.connected:
            try:
                self.client.unbind()
            except Exception:  # the connection went away in between
                pass
        if self.client.transport is not None:
            self.client.transport.loseConnection()


class LDAPServerPool:
    """The servers of one method, tried in the configured order."""

    def __init__(self, addresses: Sequence[ServerAddress], reactor, timeout: float, clock=time.monotonic):
        self.addresses = tuple(addresses)
        self._reactor = reactor
        self._timeout = timeout
        self._clock = clock

    async def connect(self, trace=None, method_id: str = "") -> LDAPConnection:
        problems = []
        for address in self.addresses:
            started = self._clock()
            endpoint = HostnameEndpoint(self._reactor, address.host, address.port, timeout=self._timeout)
            attempt = connectProtocol(endpoint, LDAPClient())
            attempt.addTimeout(self._timeout, self._reactor)
            try:
                client = await attempt
            except Exception as failure:  # refused, unreachable, DNS, timeout
                problem = f"{address}: {_describe(failure)}"
                problems.append(problem)
                _log.warn("LDAP server {server} is unavailable: {problem}", server=str(address), problem=problem)
                if trace is not None:
                    trace.add(method_id, "connect", f"{problem} (after {1000 * (self._clock() - started):.0f} ms)")
                continue
            if trace is not None:
                trace.add(method_id, "connect", f"connected to {address} in {1000 * (self._clock() - started):.0f} ms")
            return LDAPConnection(client, address, self._reactor, self._timeout)
        raise LDAPUnavailable("; ".join(problems) or "no LDAP server is configured")


def _describe(failure: Exception) -> str:
    if isinstance(failure, (defer.TimeoutError, defer.CancelledError, net_error.TimeoutError)):
        return "connection timed out"
    if isinstance(failure, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(failure, net_error.DNSLookupError):
        return "host name not found"
    return str(failure) or type(failure).__name__
