"""What the SSH service writes to the server log per connection: problems, not routine."""

from __future__ import annotations

import struct
import types

import pytest
from twisted.conch.ssh import connection, transport
from twisted.conch.ssh.common import NS

from sftpauth.ssh import MIN_CLIENT_MAX_PACKET, SFTPConnection, SFTPServerTransport, SFTPSessionChannel, SFTPUser
from log_capture import captured_logs


def logged(action) -> list[str]:
    with captured_logs() as events:
        action()
    return [
        event.get("log_format", "") for event in events
        if event.get("log_namespace", "").startswith(("sftpauth", "twisted.conch"))
    ]


def test_an_ordinary_goodbye_is_not_logged_but_other_disconnects_are():
    server = SFTPServerTransport()
    assert logged(lambda: server.receiveError(transport.DISCONNECT_BY_APPLICATION, b"disconnected by user")) == []
    lines = logged(lambda: server.receiveError(transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet"))
    assert lines == ["client disconnected: code {code}, {description}"]


def test_a_disconnect_description_cannot_forge_log_lines():
    """The client's text is shown with line breaks, escapes and bytes that are not UTF-8 escaped."""
    from twisted.logger import formatEvent

    server = SFTPServerTransport()
    with captured_logs() as events:
        server.receiveError(transport.DISCONNECT_PROTOCOL_ERROR, b"bye\n2026-11-24T07:00:00+0000 [-] forged\x1b[2J\xff")
    lines = [formatEvent(event) for event in events if event.get("log_namespace", "").startswith("sftpauth")]
    assert lines == ["client disconnected: code 2, bye\\n2026-11-24T07:00:00+0000 [-] forged\\x1b[2J\\xff"]


def test_conch_debug_and_info_lines_are_dropped_but_warnings_kept():
    server = SFTPServerTransport()
    assert logged(lambda: (server._log.debug("kex alg={alg}", alg="x"), server._log.info("NEW KEYS"))) == []
    assert logged(lambda: server._log.warn("something odd")) == ["something odd"]


def test_the_sftp_subsystem_request_of_every_login_is_not_logged():
    class Avatar:
        sftpEnabled = True

        def lookupSubsystem(self, name, data):
            return None  # conch logs this failure as an error: warnings and errors are kept

    channel = SFTPSessionChannel(avatar=Avatar())
    lines = logged(lambda: channel.request_subsystem(NS(b"sftp")))
    assert 'Asking for subsystem "{subsystem}"' not in lines
    assert lines == ["Failed to get subsystem {subsystem}"]


def test_a_second_subsystem_on_one_channel_is_refused_with_an_info_line_not_an_error():
    """RFC 4254 allows one subsystem per session channel; a client asking twice is told no, logged as info."""

    class Avatar:
        sftpEnabled = True

        def lookupSubsystem(self, name, data):
            raise AssertionError("not looked up a second time")

    channel = SFTPSessionChannel(avatar=Avatar())
    channel.client = object()  # the first subsystem runs
    with captured_logs() as events:
        assert channel.request_subsystem(NS(b"sftp")) == 0
    mine = [event for event in events if event.get("log_namespace", "").startswith(("sftpauth", "twisted.conch"))]
    assert [(event["log_format"], event["log_level"].name) for event in mine] == [
        ("refused a second subsystem request on one session channel", "info")]


class _Sent:
    """An SSH transport that keeps the packets sent, with an avatar offering session channels."""

    def __init__(self):
        self.packets = []
        self.avatar = SFTPUser.__new__(SFTPUser)
        self.avatar.channelLookup = {b"session": SFTPSessionChannel}

    def sendPacket(self, kind, payload):
        self.packets.append((kind, payload))


@pytest.mark.parametrize(("max_packet", "refused"), [(1, True), (MIN_CLIENT_MAX_PACKET - 1, True), (MIN_CLIENT_MAX_PACKET, False),
                                                     (32768, False)])
def test_a_session_channel_announcing_a_tiny_maximum_packet_is_refused(monkeypatch, max_packet, refused):
    """Under MIN_CLIENT_MAX_PACKET bytes per packet every reply would cost a packet per few bytes: refused."""
    conn = SFTPConnection()
    conn.transport = _Sent()
    opened = []
    monkeypatch.setattr(connection.SSHConnection, "ssh_CHANNEL_OPEN", lambda self, packet: opened.append(packet))
    conn.ssh_CHANNEL_OPEN(NS(b"session") + struct.pack(">3L", 7, 2 ** 20, max_packet))
    if refused:
        [(kind, payload)] = conn.transport.packets
        assert kind == connection.MSG_CHANNEL_OPEN_FAILURE
        assert struct.unpack(">2L", payload[:8]) == (7, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)
        assert opened == []
    else:
        assert conn.transport.packets == [] and len(opened) == 1


def test_routine_requests_of_every_openssh_login_are_refused_without_a_log_line():
    """OpenSSH sends env LANG (and keepalives) on every login: refused quietly; a shell request is still logged."""
    channel = SFTPSessionChannel(avatar=None)
    answers = []
    lines = logged(lambda: answers.append(channel.requestReceived(b"env", NS(b"LANG") + NS(b"C.UTF-8"))))
    assert answers == [0] and lines == []
    lines = logged(lambda: answers.append(channel.requestReceived(b"shell", b"")))
    assert answers == [0, 0] and lines == ["refused a {request!r} request on an SFTP-only session"]


def test_names_the_client_chose_are_cut_short_in_log_lines():
    """A logged-in client may send request, subsystem and channel types of a packet's size: each line stays short."""
    from twisted.logger import formatEvent

    huge = b"c" * 250_000
    channel = SFTPSessionChannel(avatar=types.SimpleNamespace(sftpEnabled=True))
    conn = SFTPConnection()
    conn.transport = _Sent()
    with captured_logs() as events:
        channel.requestReceived(huge, b"")
        channel.request_subsystem(NS(huge))
        conn.ssh_CHANNEL_OPEN(NS(huge) + struct.pack(">3L", 7, 2 ** 20, 32768))
    lines = [formatEvent(event) for event in events if event.get("log_namespace", "").startswith("sftpauth")]
    assert lines == [
        f"refused a '{'c' * 64}...' request on an SFTP-only session",
        f"refused the '{'c' * 64}...' subsystem",
        f"refused a '{'c' * 64}...' channel (only SFTP sessions are available)",
    ]
    assert [kind for kind, _ in conn.transport.packets] == [connection.MSG_CHANNEL_OPEN_FAILURE]
