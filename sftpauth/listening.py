"""Listening sockets of the services: address, port and connection limit."""

from __future__ import annotations

import ipaddress

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from sftpauth.config.models import ServiceSettings

_log = Logger()


class _CountedProtocol(ProtocolWrapper):
    def connectionMade(self) -> None:
        factory = self.factory
        if factory.open_connections >= factory.limit:
            factory.refused += 1
            _log.warn(
                "service {service}: refusing a connection from {peer}: maximum_concurrent_connections ({limit}) reached",
                service=factory.service_id,
                peer=self.transport.getPeer().host,
                limit=factory.limit,
            )
            self.transport.loseConnection()
            return
        factory.open_connections += 1
        self._counted = True
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        if getattr(self, "_counted", False):
            self.factory.open_connections -= 1
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class ConnectionLimitFactory(WrappingFactory):
    """Refuse connections above ``maximum_concurrent_connections``."""

    protocol = _CountedProtocol

    def __init__(self, wrapped: IProtocolFactory, limit: int, service_id: str):
        super().__init__(wrapped)
        self.limit = limit
        self.service_id = service_id
        self.open_connections = 0
        self.refused = 0


def endpoint_for(reactor, address: str, port: int):
    try:
        is_v6 = ipaddress.ip_address(address).version == 6
    except ValueError:
        is_v6 = False
    if is_v6:
        return TCP6ServerEndpoint(reactor, port, interface=address)
    return TCP4ServerEndpoint(reactor, port, interface=address)


def listening_service(reactor, settings: ServiceSettings, factory: IProtocolFactory) -> StreamServerEndpointService:
    limited = ConnectionLimitFactory(factory, settings.maximum_concurrent_connections, settings.id)
    service = StreamServerEndpointService(endpoint_for(reactor, settings.address, settings.port), limited)
    service.setName(settings.id)
    # A port that cannot be bound must stop the process, not log and go on.
    service._raiseSynchronously = True
    return service
