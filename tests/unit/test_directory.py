"""The embedded demo directory's protocol: LDAP answered, anything else closed quietly."""

from __future__ import annotations

import io

from ldaptor.inmemory import fromLDIFFile
from ldaptor.protocols import pureldap
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel

from sftpauth.directory import DirectoryFactory
from log_capture import captured_logs

LDIF = b"dn: dc=example,dc=com\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n"
TLS_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)


def _connection():
    loading = fromLDIFFile(io.BytesIO(LDIF))
    roots = []
    loading.addCallback(roots.append)
    protocol = DirectoryFactory(roots[0]).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def test_bytes_that_are_not_ldap_close_the_connection_with_one_short_line(capsys):
    """A TLS ClientHello (a client set to LDAPS) gets the connection closed and one info line, nothing printed."""
    with captured_logs() as events:
        protocol, transport = _connection()
        protocol.dataReceived(TLS_CLIENT_HELLO)
    assert transport.disconnecting
    assert transport.value() == b""
    (event,) = [event for event in events if "embedded LDAP directory" in event.get("log_format", "")]
    assert event["log_level"] == LogLevel.info and event["host"] == "127.0.0.1"
    assert not [event for event in events if event.get("log_level") in (LogLevel.error, LogLevel.critical)]
    assert capsys.readouterr().out == ""  # ldaptor printed a 2 KB repr of its decoder


def test_garbage_after_a_request_closes_after_answering_it():
    """A good request is answered; what follows it that is not LDAP closes the connection."""
    protocol, transport = _connection()
    bind = pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=b"", auth=b""), id=1).toWire()
    protocol.dataReceived(bind + TLS_CLIENT_HELLO)
    assert transport.value()[:1] == b"\x30"
    assert transport.disconnecting


def test_an_ldap_request_is_still_answered():
    """An anonymous BIND gets its BindResponse and the connection stays open."""
    protocol, transport = _connection()
    protocol.dataReceived(pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=b"", auth=b""), id=1).toWire())
    assert not transport.disconnecting
    assert transport.value()[:1] == b"\x30"  # an LDAPMessage (SEQUENCE) came back


def test_a_request_announced_over_16_mib_closes_the_connection_at_its_header():
    """A client announcing a 2 GiB request is not buffered: the connection closes on the first bytes."""
    protocol, transport = _connection()
    protocol.dataReceived(b"\x30\x84\x7f\xff\xff\xff\x02\x01\x01" + bytes(4096))
    assert transport.disconnecting
    assert transport.value() == b""


def test_starttls_is_refused_with_protocol_error_and_one_info_line():
    """QA (docs): a client set to StartTLS got ldaptor's "Unknown extended request" and no log line. It gets
    protocolError with a message that says why (RFC 4511 4.14.2), the log one info line; the connection stays."""
    from ldaptor.protocols.ldap.ldaperrors import LDAPProtocolError

    from sftpauth.auth.ldap.wire import LDAP_DECODER, MessageBuffer

    MESSAGE = "StartTLS is not supported: the embedded demo directory speaks plain LDAP only"
    with captured_logs() as events:
        protocol, transport = _connection()
        protocol.dataReceived(pureldap.LDAPMessage(pureldap.LDAPStartTLSRequest(), id=1).toWire())
    buffer = MessageBuffer()
    buffer.feed(transport.value())
    message = buffer.next(LDAP_DECODER)
    assert isinstance(message.value, pureldap.LDAPExtendedResponse)
    assert message.value.resultCode == LDAPProtocolError.resultCode
    assert message.value.errorMessage in (MESSAGE, MESSAGE.encode())
    assert not transport.disconnecting
    (event,) = [event for event in events if "refused StartTLS" in event.get("log_format", "")]
    assert event["log_level"] == LogLevel.info and event["host"] == "127.0.0.1"
