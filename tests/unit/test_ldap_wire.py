"""LDAP messages from a byte stream (wire.py), and the LDAP client meeting a server that does not speak LDAP."""

from __future__ import annotations

import pytest
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from sftpauth.auth.ldap.client import _LDAPProtocol
from sftpauth.auth.ldap.wire import LDAP_DECODER, MessageBuffer, NotLDAP, decode_message
from log_capture import captured_logs

# An HTTP server on the LDAP port: 'H' (0x48) is a tag ldaptor does not know, 'T' a length it then skips.
HTTP_ANSWER = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nContent-Length: 150\r\n\r\n" + b"<html>" * 40


def _decoder():
    return LDAPClient().berdecoder


def _bind_response(message_id: int = 1) -> bytes:
    return pureldap.LDAPMessage(pureldap.LDAPBindResponse(resultCode=0), id=message_id).toWire()


def test_a_whole_message_is_decoded_and_its_length_given():
    wire = _bind_response()
    message, used = decode_message(_decoder(), wire + b"\x30")
    assert isinstance(message.value, pureldap.LDAPBindResponse) and message.id == 1
    assert used == len(wire)


@pytest.mark.parametrize("cut", [0, 1, 2, 5])
def test_an_incomplete_message_waits_for_more(cut):
    assert decode_message(_decoder(), _bind_response()[:cut]) == (None, 0)


def test_bytes_that_cannot_begin_an_ldap_message_are_refused_with_the_byte(capsys):
    with pytest.raises(NotLDAP, match="byte 0x48"):
        decode_message(_decoder(), HTTP_ANSWER)
    assert capsys.readouterr().out == ""  # ldaptor printed a 2 KB repr of its decoder for such a tag


def test_a_sequence_that_is_not_an_ldap_message_is_refused():
    with pytest.raises(NotLDAP, match="cannot be decoded"):
        decode_message(_decoder(), b"\x30\x03\x02\x01\x01")  # a message ID and no operation


def _client():
    protocol = _LDAPProtocol()
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 389))
    protocol.makeConnection(transport)
    protocol.connectionMade()
    return protocol, transport


def test_a_server_answering_http_fails_the_waiting_request_at_once(capsys):
    """The BIND waiting on the connection fails as soon as the answer is seen not to be LDAP, not at the timeout."""
    protocol, transport = _client()
    waiting = protocol.send(pureldap.LDAPBindRequest(dn="uid=alice,dc=example,dc=com", auth=b"secret"))
    failures = []
    waiting.addErrback(failures.append)
    protocol.dataReceived(HTTP_ANSWER)
    assert transport.disconnecting
    assert protocol.protocol_error == "it does not begin with an LDAP message: byte 0x48"
    protocol.connectionLost(Failure(ConnectionAborted()))  # what the aborted transport reports
    assert len(failures) == 1
    assert capsys.readouterr().out == ""


def test_an_unknown_operation_inside_a_message_is_refused_without_printing_and_named_host_port(capsys):
    """ldaptor printed a 2 KB repr of its decoder to stdout (the server log) for a tag inside a message it did not know."""
    protocol, transport = _client()
    waiting = protocol.send(pureldap.LDAPBindRequest(dn="", auth=b""))
    waiting.addErrback(lambda failure: None)
    with captured_logs() as events:
        protocol.dataReceived(bytes.fromhex("30050201017e00"))  # message 1, operation [APPLICATION 30]
    assert transport.disconnecting and "cannot be decoded" in protocol.protocol_error
    assert capsys.readouterr().out == ""
    [line] = [formatEvent(event) for event in events if event.get("log_namespace", "").startswith("sftpauth")]
    assert line.startswith("LDAP server 127.0.0.1:389 sent data that is not an LDAP answer (")


def test_an_unknown_element_the_decoder_skips_is_skipped_without_printing(capsys):
    """An element of an unknown tag after a known answer's fields is skipped, as ldaptor does, quietly."""
    wire = bytearray(_bind_response(1))
    wire[1] += 2
    wire += b"\x9f\x00"  # an extra [CONTEXT 31]-style element no context knows
    message, used = decode_message(LDAP_DECODER, bytes(wire))
    assert isinstance(message.value, pureldap.LDAPBindResponse) and used == len(wire)
    assert capsys.readouterr().out == ""


def test_answers_before_the_garbage_are_delivered():
    protocol, transport = _client()
    first = protocol.send(pureldap.LDAPBindRequest(dn="", auth=b""))
    answers = []
    first.addCallback(answers.append)
    (message_id,) = protocol.onwire  # ldaptor numbers messages from a counter of its own
    protocol.dataReceived(_bind_response(message_id) + HTTP_ANSWER)
    assert len(answers) == 1 and answers[0].resultCode == 0
    assert transport.disconnecting and "0x48" in protocol.protocol_error


# -- MessageBuffer: messages cut from the stream, within a limit ----------------------------


def test_messages_split_across_reads_and_packed_into_one_come_out_whole_and_in_order():
    buffer = MessageBuffer()
    wire = _bind_response(1) + _bind_response(2) + _bind_response(3)
    for byte in wire[:-1]:  # one byte at a time: nothing until the first message is whole
        buffer.feed(bytes([byte]))
    ids = []
    while (message := buffer.next(_decoder())) is not None:
        ids.append(message.id)
    assert ids == [1, 2]
    buffer.feed(wire[-1:])
    assert buffer.next(_decoder()).id == 3
    assert buffer.next(_decoder()) is None


@pytest.mark.parametrize(
    "header, why",
    [
        (b"\x30\x84\x7f\xff\xff\xff\x02\x01\x01", "a message of 2147483653 bytes, over the limit of 16 MiB"),
        (b"\x30\x84\x01\x00\x00\x00", "a message of 16777222 bytes, over the limit of 16 MiB"),
        (b"\x30\x80\x02\x01\x01", "not a definite length"),
        (b"\x30\x85\x01\x00\x00\x00\x00", "not a definite length"),
    ],
)
def test_a_message_announced_over_the_limit_or_without_a_length_is_refused_at_its_header(header, why):
    """A peer announcing 2 GiB is refused on its first bytes, not buffered until the timeout."""
    buffer = MessageBuffer()
    buffer.feed(header)
    with pytest.raises(NotLDAP, match=why):
        buffer.next(_decoder())


def test_a_message_of_exactly_the_limit_is_waited_for():
    limit = len(_bind_response())
    buffer = MessageBuffer(limit=limit)
    buffer.feed(_bind_response()[:4])
    assert buffer.next(_decoder()) is None
    buffer.feed(_bind_response()[4:])
    assert buffer.next(_decoder()).id == 1


def test_a_server_announcing_a_huge_answer_fails_the_waiting_request_at_once():
    """The QA case: 2 GiB announced, then 64 KiB reads; the BIND fails on the header, and nothing is kept."""
    protocol, transport = _client()
    failures = []
    protocol.send(pureldap.LDAPBindRequest(dn="uid=alice,dc=example,dc=com", auth=b"secret")).addErrback(failures.append)
    protocol.dataReceived(b"\x30\x84\x7f\xff\xff\xff\x02\x01\x01" + b"\0" * 65536)
    assert transport.disconnecting
    assert protocol.protocol_error == "a message of 2147483653 bytes, over the limit of 16 MiB"
    protocol.connectionLost(Failure(ConnectionAborted()))
    assert len(failures) == 1
