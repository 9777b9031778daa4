"""One SSH connection's SFTP sessions in memory: flow control, handle limit, listings, names.

The harness drives conch's real connection service (channel open, the
``sftp`` subsystem request, channel data, window adjusts, close) with the
packets a client would send, and runs the "thread pool" by hand, so each
test sees exactly which file work was started and what reached the wire.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable

import pytest
from twisted.conch.ssh import connection
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.filetransfer import FileTransferBase
from twisted.internet import defer

from sftpauth import ssh
from sftpauth.account import Account
from sftpauth.filesystem import FolderReader, JailedFilesystem
from sftpauth.permissions import FULL_CONTROL, Permission

FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ = 1, 2, 3, 4, 5
FXP_WRITE, FXP_SETSTAT, FXP_FSETSTAT = 6, 9, 10
FXP_OPENDIR, FXP_READDIR, FXP_REMOVE, FXP_MKDIR, FXP_RMDIR, FXP_RENAME = 11, 12, 13, 14, 15, 18
FILEXFER_ATTR_SIZE, FILEXFER_ATTR_PERMISSIONS = 0x01, 0x04
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS = 101, 102, 103, 104, 105
FX_OK, FX_EOF, FX_PERMISSION_DENIED, FX_FAILURE, FX_BAD_MESSAGE = 0, 1, 3, 4, 5
FXF_READ, FXF_WRITE, FXF_CREAT, FXF_TRUNC = 0x01, 0x02, 0x08, 0x10
CLIENT_WINDOW = 2 * 1024 * 1024
CLIENT_MAX_PACKET = 32768


class ManualThreads:
    """A ``run_in_thread`` whose jobs run only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple, defer.Deferred]] = []
        self.started: list[Callable[..., Any]] = []
        self.inside = False

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((function, args, d))
        return d

    def run_one(self) -> None:
        function, args, d = self.jobs.pop(0)
        self.started.append(function)
        self.inside = True
        try:
            result = function(*args)
        except BaseException:
            self.inside = False
            d.errback()
        else:
            self.inside = False
            d.callback(result)

    def run_all(self, limit: int = 100_000, newest_first: bool = False) -> None:
        """Run the jobs, and those they start; ``newest_first``: as a thread pool may, the last one queued first."""
        while self.jobs and limit:
            if newest_first:
                self.jobs.insert(0, self.jobs.pop())
            self.run_one()
            limit -= 1


class FakeSSHTransport:
    """The SSH transport under the connection service: records the packets sent to the client."""

    def __init__(self, avatar: ssh.SFTPUser):
        self.avatar = avatar
        self.packets: list[tuple[int, bytes]] = []

    def sendPacket(self, kind: int, payload: bytes) -> None:
        self.packets.append((kind, payload))


class Client:
    """The client side of one connection: sends channel packets, reads the SFTP answers."""

    def __init__(self, home: str, permissions=FULL_CONTROL, log_as: str = ""):
        account = Account(
            username="alice", method_id="local", home_folder=home,
            permissions=frozenset(permissions),
            groups=("users",),
        )
        self.threads = ManualThreads()
        self.avatar = ssh.SFTPUser(account, JailedFilesystem(home, account.permissions, self.threads, log_as=log_as))
        self.ssh = FakeSSHTransport(self.avatar)
        self.connection = ssh.SFTPConnection()
        self.connection.transport = self.ssh
        self.connection.serviceStarted()
        self.received: dict[int, bytes] = {}  # local channel -> SFTP bytes received

    def open_sftp(self, window: int = CLIENT_WINDOW) -> int:
        """Open a session channel with the sftp subsystem and do INIT; returns the channel number."""
        number = self.connection.localChannelID
        self.connection.ssh_CHANNEL_OPEN(NS(b"session") + struct.pack(">3L", 100 + number, window, CLIENT_MAX_PACKET))
        self.connection.ssh_CHANNEL_REQUEST(struct.pack(">L", number) + NS(b"subsystem") + b"\x00" + NS(b"sftp"))
        self.received[number] = b""
        self.send(number, sftp_packet(FXP_INIT, struct.pack("!L", 3)))
        assert self.answers(number)[0][0] == FXP_VERSION
        return number

    def channel(self, number: int) -> ssh.SFTPSessionChannel:
        return self.connection.channels[number]

    def window_left(self, number: int) -> int:
        return self.channel(number).localWindowLeft

    def send(self, number: int, data: bytes) -> None:
        """Channel data, as a client honouring the server's window sends it."""
        for start in range(0, len(data), CLIENT_MAX_PACKET):
            chunk = data[start : start + CLIENT_MAX_PACKET]
            assert len(chunk) <= self.window_left(number), "the client would have to wait for the window"
            self.connection.ssh_CHANNEL_DATA(struct.pack(">L", number) + NS(chunk))

    def send_while_window(self, number: int, packets: list[bytes]) -> int:
        """Send requests until the server's window is used up; returns how many were sent."""
        for count, packet in enumerate(packets):
            if len(packet) > self.window_left(number):
                return count
            self.connection.ssh_CHANNEL_DATA(struct.pack(">L", number) + NS(packet))
        return len(packets)

    def read_window(self, number: int, size: int) -> None:
        """The client read ``size`` bytes and opens its window again."""
        self.connection.ssh_CHANNEL_WINDOW_ADJUST(struct.pack(">2L", number, size))

    def close_channel(self, number: int) -> None:
        self.connection.ssh_CHANNEL_CLOSE(struct.pack(">L", number))

    def collect(self) -> int:
        """Move the channel data sent so far into ``received``; returns how many bytes that was."""
        count = 0
        for kind, payload in self.ssh.packets:
            if kind == connection.MSG_CHANNEL_DATA:
                remote = struct.unpack(">L", payload[:4])[0]
                data = getNS(payload[4:])[0]
                self.received[remote - 100] += data
                count += len(data)
        self.ssh.packets = [(kind, payload) for kind, payload in self.ssh.packets if kind != connection.MSG_CHANNEL_DATA]
        return count

    def answers(self, number: int) -> list[tuple[int, bytes]]:
        """The complete SFTP answers received on a channel since the last call."""
        self.collect()
        data, found = self.received[number], []
        while len(data) >= 5:
            length, kind = struct.unpack("!LB", data[:5])
            if len(data) < 4 + length:
                break
            found.append((kind, data[5 : 4 + length]))
            data = data[4 + length :]
        self.received[number] = data
        return found

    def request(self, number: int, kind: int, payload: bytes) -> tuple[int, bytes]:
        """One request and its answer (the thread jobs it needs are run)."""
        self.send(number, sftp_packet(kind, payload))
        self.threads.run_all()
        answers = self.answers(number)
        assert len(answers) == 1, answers
        return answers[0]

    def open(self, number: int, name: bytes, flags: int = FXF_READ, request_id: int = 1) -> tuple[int, bytes]:
        kind, body = self.request(number, FXP_OPEN, struct.pack("!L", request_id) + NS(name) + struct.pack("!LL", flags, 0))
        return kind, (getNS(body[4:])[0] if kind == FXP_HANDLE else body)

    def sent_kinds(self) -> list[int]:
        return [kind for kind, _ in self.ssh.packets]


def sftp_packet(kind: int, payload: bytes) -> bytes:
    return struct.pack("!LB", len(payload) + 1, kind) + payload


def read_request(request_id: int, handle: bytes, offset: int, length: int) -> bytes:
    return sftp_packet(FXP_READ, struct.pack("!L", request_id) + NS(handle) + struct.pack("!QL", offset, length))


def status_of(body: bytes) -> tuple[int, str]:
    code = struct.unpack("!L", body[4:8])[0]
    return code, getNS(body[8:])[0].decode()


def counted_preads(monkeypatch) -> list[int]:
    """Record the length of every ``os.pread`` (each read that really touched the file)."""
    lengths: list[int] = []
    real = os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        lengths.append(length)
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    return lengths


@pytest.fixture
def home(tmp_path):
    folder = tmp_path / "alice"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    return str(folder)


# -- flow control --------------------------------------------------------------------


def test_pipelined_reads_nobody_collects_stop_the_session_and_close_the_window(home, monkeypatch):
    """A client that pipelines reads and never opens its window gets a few answered, then the server stops reading its requests."""
    preads = counted_preads(monkeypatch)
    client = Client(home)
    number = client.open_sftp(window=64 * 1024)  # the client's window: it reads nothing after 64 KB
    _, handle = client.open(number, b"big.bin")
    requests = [read_request(10 + index, handle, (index * 262144) % (4 * 1024 * 1024), 262144) for index in range(4000)]
    sent = client.send_while_window(number, requests)
    assert sent < len(requests)  # the server's window closed: the client has to wait
    client.threads.run_all()
    sent += client.send_while_window(number, requests[sent:])
    client.threads.run_all()
    # It worked on a bounded number of reads, and its window stayed closed on the rest.
    assert sent < len(requests)
    assert client.window_left(number) < len(requests[sent])
    assert 0 < len(preads) * 262144 <= ssh.OUTPUT_HIGH_WATER + ssh.MAX_PENDING_REPLY_BYTES + 262144


def test_a_slow_client_gets_every_answer_in_order_once_it_reads(home):
    """Flow control only delays: a client that reads slowly gets all its reads answered, in order, byte-exact."""
    client = Client(home)
    number = client.open_sftp(window=100_000)
    _, handle = client.open(number, b"big.bin")
    expected = open(os.path.join(home, "big.bin"), "rb").read()
    requests = [read_request(index, handle, index * 32768, 32768) for index in range(128)]
    pending = list(requests)
    data = b""
    while len(data) < len(expected):
        sent = client.send_while_window(number, pending)
        pending = pending[sent:]
        client.threads.run_all()
        received = client.collect()
        for kind, body in client.answers(number):
            assert kind == FXP_DATA
            data += getNS(body[4:])[0]
        assert received, "no progress"
        client.read_window(number, received)
    assert data == expected


def test_reads_waiting_when_the_client_leaves_are_dropped_and_nothing_is_sent(home, monkeypatch):
    """Reads queued behind a running one are never run once the channel closes, and nothing more goes to the client."""
    preads = counted_preads(monkeypatch)
    client = Client(home)
    number = client.open_sftp()
    _, handle = client.open(number, b"big.bin")
    client.send(number, b"".join(read_request(10 + index, handle, index * 32768, 32768) for index in range(40)))
    assert len(client.threads.jobs) == 1  # one read at a time per file; the others wait for it
    client.close_channel(number)
    client.ssh.packets.clear()
    client.threads.run_all()
    assert len(preads) <= 1
    assert connection.MSG_CHANNEL_DATA not in client.sent_kinds()
    assert os.close in client.threads.started  # the file itself was closed


def test_output_of_a_closed_channel_is_dropped_and_the_close_is_answered(home):
    """A client that closes its channel with answers still unread gets the close at once; the backlog is freed."""
    client = Client(home)
    number = client.open_sftp(window=1024)
    _, handle = client.open(number, b"big.bin")
    client.send(number, b"".join(read_request(10 + index, handle, index * 32768, 32768) for index in range(8)))
    client.threads.run_all()
    client.ssh.packets.clear()
    client.close_channel(number)
    assert connection.MSG_CHANNEL_CLOSE in client.sent_kinds()
    assert number not in client.connection.channels


def test_channel_output_is_split_to_the_window_and_the_maximum_packet():
    """Answers go out in packets no larger than the client's maximum, never beyond its window, in order."""
    sent: list[bytes] = []

    class Connection:
        def sendData(self, channel, data):
            sent.append(data)

        def sendClose(self, channel):
            pass

    channel = ssh.SFTPSessionChannel(remoteWindow=100_000, remoteMaxPacket=32768, conn=Connection())
    payload = os.urandom(300_000)
    channel.write(payload[:150_000])
    channel.write(payload[150_000:])
    assert sum(map(len, sent)) == 100_000 and max(map(len, sent)) <= 32768
    channel.addWindowBytes(150_000)
    channel.addWindowBytes(50_000)
    assert b"".join(sent) == payload and max(map(len, sent)) <= 32768


def test_channel_pauses_its_producer_while_the_client_does_not_read():
    """Above the high-water mark the SFTP session is paused; it resumes once the client read down to the low-water mark."""
    calls: list[str] = []

    class Producer:
        def pauseProducing(self):
            calls.append("pause")

        def resumeProducing(self):
            calls.append("resume")

    class Connection:
        def sendData(self, channel, data):
            pass

    channel = ssh.SFTPSessionChannel(remoteWindow=0, remoteMaxPacket=32768, conn=Connection())
    channel.registerProducer(Producer(), True)
    channel.write(b"x" * ssh.OUTPUT_HIGH_WATER)
    assert calls == []
    channel.write(b"x")
    assert calls == ["pause"]
    channel.addWindowBytes(ssh.OUTPUT_HIGH_WATER - ssh.OUTPUT_LOW_WATER)
    assert calls == ["pause"]
    channel.addWindowBytes(1)
    assert calls == ["pause", "resume"]


# -- handles -------------------------------------------------------------------------


def test_open_handles_are_limited_per_connection_across_sessions(home, monkeypatch):
    """Files and folders open in all sessions of a connection count together against MAX_OPEN_HANDLES."""
    monkeypatch.setattr(ssh, "MAX_OPEN_HANDLES", 5)
    client = Client(home)
    first, second = client.open_sftp(), client.open_sftp()
    handles = [client.open(first, b"big.bin", request_id=index)[1] for index in range(3)]
    folder = client.request(second, FXP_OPENDIR, struct.pack("!L", 7) + NS(b"/"))
    assert folder[0] == FXP_HANDLE
    assert client.open(second, b"big.bin")[0] == FXP_HANDLE
    kind, body = client.open(second, b"big.bin")
    assert kind == FXP_STATUS and status_of(body) == (FX_FAILURE, "too many open files (at most 5)")
    kind, body = client.request(second, FXP_OPENDIR, struct.pack("!L", 8) + NS(b"/"))
    assert kind == FXP_STATUS and status_of(body)[1] == "too many open files (at most 5)"
    assert client.request(first, FXP_CLOSE, struct.pack("!L", 9) + NS(handles[0]))[0] == FXP_STATUS
    assert client.open(second, b"big.bin")[0] == FXP_HANDLE


def test_a_handle_that_is_not_open_is_an_invalid_handle_for_close_as_for_read(home):
    """CLOSE of a handle closed already, or never given, answers as READ does: not "No such file"."""
    client = Client(home)
    number = client.open_sftp()
    handle = client.open(number, b"big.bin")[1]
    assert status_of(client.request(number, FXP_CLOSE, struct.pack("!L", 2) + NS(handle))[1]) == (FX_OK, "file closed")
    for request_id, stale in ((3, handle), (4, b"never-given")):
        kind, body = client.request(number, FXP_CLOSE, struct.pack("!L", request_id) + NS(stale))
        assert (kind, status_of(body)) == (FXP_STATUS, (FX_FAILURE, "invalid handle"))
    client.send(number, read_request(5, handle, 0, 10))
    [(kind, body)] = client.answers(number)
    assert (kind, status_of(body)) == (FXP_STATUS, (FX_FAILURE, "invalid handle"))


def test_handles_of_a_closed_session_no_longer_count(home, monkeypatch):
    """When one session of the connection ends, its handles are closed and free for the others."""
    monkeypatch.setattr(ssh, "MAX_OPEN_HANDLES", 2)
    client = Client(home)
    first, second = client.open_sftp(), client.open_sftp()
    client.open(first, b"big.bin")
    client.open(first, b"big.bin")
    assert client.open(second, b"big.bin")[0] == FXP_STATUS
    client.close_channel(first)
    client.threads.run_all()
    assert client.avatar.openHandles() == 0
    assert client.open(second, b"big.bin")[0] == FXP_HANDLE


# -- listings ------------------------------------------------------------------------


def conch_listing_body(entries: list[tuple[bytes, bytes, dict]]) -> bytes:
    packer = FileTransferBase()
    return struct.pack("!L", len(entries)) + b"".join(
        NS(name) + NS(longname) + packer._packAttributes(attrs) for name, longname, attrs in entries
    )


def test_readdir_is_formatted_in_the_thread_and_answered_in_batches(home, monkeypatch):
    """Every ls -l line is made in a thread job, batches hold at most 250 entries, and each entry is conch's encoding of its file."""
    folder = os.path.join(home, "many")
    os.mkdir(folder)
    names = [f"file_{index:04d}_with_a_longish_name.txt" for index in range(600)]
    for name in names:
        with open(os.path.join(folder, name), "w") as file:
            file.write(name)
    client = Client(home)
    real_long_name = ssh.long_name
    outside = []

    def long_name(*args, **kwargs):
        if not client.threads.inside:
            outside.append(args[0])
        return real_long_name(*args, **kwargs)

    monkeypatch.setattr(ssh, "long_name", long_name)
    number = client.open_sftp()
    kind, body = client.request(number, FXP_OPENDIR, struct.pack("!L", 1) + NS(b"many"))
    assert kind == FXP_HANDLE
    handle = getNS(body[4:])[0]
    batches = []
    while True:
        kind, body = client.request(number, FXP_READDIR, struct.pack("!L", 2) + NS(handle))
        if kind == FXP_STATUS:
            assert status_of(body)[0] == FX_EOF
            break
        assert kind == FXP_NAME
        batches.append(body[4:])
    assert outside == []
    counts = [struct.unpack("!L", batch[:4])[0] for batch in batches]
    assert sum(counts) == 600 and max(counts) <= 250
    owner, group = client.avatar.account.listing_owner
    expected = {}
    for name in names:
        result = os.stat(os.path.join(folder, name))
        line = real_long_name(name, result, owner, group)
        expected[name] = conch_listing_body([(name.encode(), line.encode(), ssh._attributes(result))])[4:]
    received = []  # (name, the entry's bytes): in the folder's own order, as OpenSSH's sftp-server sends them
    for batch, count in zip(batches, counts):
        rest = batch[4:]
        for _ in range(count):
            name, after_name = getNS(rest)
            after_line = getNS(after_name)[1]
            size = len(rest) - len(after_line) + ATTRIBUTES_SIZE
            received.append((name.decode(), rest[:size]))
            rest = rest[size:]
        assert rest == b""
    assert len(received) == 600 and dict(received) == expected


ATTRIBUTES_SIZE = 4 + 8 + 4 + 4 + 4  # flags, size, permissions, atime, mtime


def test_a_folder_is_read_a_batch_at_a_time(home, monkeypatch):
    """An open listing holds one batch, not the whole folder: READDIR reads the folder on as it answers."""
    folder = os.path.join(home, "many")
    os.mkdir(folder)
    for index in range(600):
        open(os.path.join(folder, f"f{index:04d}"), "w").close()
    reads = []
    real_read = FolderReader.read

    def read(self, count):
        entries = real_read(self, count)
        reads.append(len(entries))
        return entries

    monkeypatch.setattr(FolderReader, "read", read)
    client = Client(home)
    number = client.open_sftp()
    kind, body = client.request(number, FXP_OPENDIR, struct.pack("!L", 1) + NS(b"many"))
    assert kind == FXP_HANDLE and reads == [250]  # the first batch only
    handle = getNS(body[4:])[0]
    client.request(number, FXP_READDIR, struct.pack("!L", 2) + NS(handle))
    client.request(number, FXP_READDIR, struct.pack("!L", 3) + NS(handle))
    assert reads == [250, 250]
    kind, body = client.request(number, FXP_CLOSE, struct.pack("!L", 4) + NS(handle))
    assert kind == FXP_STATUS and status_of(body)[0] == FX_OK
    assert reads == [250, 250]  # closed without reading the rest


def test_a_small_folder_is_listed_in_one_thread_trip(home):
    """opendir reads the folder and makes the first batch in one thread job; its READDIRs, EOF and CLOSE need none."""
    folder = os.path.join(home, "few")
    os.mkdir(folder)
    for name in ("a.txt", "b.txt", "c.txt"):
        open(os.path.join(folder, name), "w").close()
    client = Client(home)
    number = client.open_sftp()
    client.threads.started.clear()
    kind, body = client.request(number, FXP_OPENDIR, struct.pack("!L", 1) + NS(b"few"))
    assert kind == FXP_HANDLE and len(client.threads.started) == 1
    handle = getNS(body[4:])[0]
    kind, body = client.request(number, FXP_READDIR, struct.pack("!L", 2) + NS(handle))
    assert kind == FXP_NAME and struct.unpack("!L", body[4:8])[0] == 3
    kind, body = client.request(number, FXP_READDIR, struct.pack("!L", 3) + NS(handle))
    assert kind == FXP_STATUS and status_of(body)[0] == FX_EOF
    kind, body = client.request(number, FXP_CLOSE, struct.pack("!L", 4) + NS(handle))
    assert kind == FXP_STATUS and status_of(body)[0] == FX_OK
    assert len(client.threads.started) == 1


def test_pack_attributes_is_conchs_encoding():
    """The attributes packed in the thread are byte for byte what conch packs for stat answers."""
    attrs = ssh._attributes(os.stat(__file__))
    assert ssh.pack_attributes(attrs) == FileTransferBase()._packAttributes(attrs)


# -- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"line\nfeed", b"carriage\rreturn", b"esc\x1b[31mred", b"bell\x07", b"tab\there", b"del\x7f"])
def test_names_with_control_characters_cannot_be_created(home, name):
    """open with create, mkdir and rename to a name with a C0 control character or DEL are refused with a clear message."""
    client = Client(home)
    number = client.open_sftp()
    before = sorted(os.listdir(home))
    answers = [
        client.open(number, name, FXF_WRITE | FXF_CREAT | FXF_TRUNC),
        client.request(number, FXP_MKDIR, struct.pack("!L", 2) + NS(name) + struct.pack("!L", 0)),
        client.request(number, FXP_RENAME, struct.pack("!L", 3) + NS(b"big.bin") + NS(name)),
    ]
    for kind, body in answers:
        assert kind == FXP_STATUS
        code, message = status_of(body)
        assert code == FX_BAD_MESSAGE
        assert message.startswith("file name not allowed: the name contains ")
    assert sorted(os.listdir(home)) == before


def test_existing_names_with_control_characters_stay_usable(home):
    """A file put there by other means with LF in its name can be listed, read, rewritten and removed."""
    name = "made\nelsewhere"
    with open(os.path.join(home, name), "wb") as file:
        file.write(b"content")
    client = Client(home)
    number = client.open_sftp()
    kind, handle = client.open(number, name.encode())
    assert kind == FXP_HANDLE
    kind, body = client.request(number, FXP_READ, struct.pack("!L", 2) + NS(handle) + struct.pack("!QL", 0, 100))
    assert kind == FXP_DATA and getNS(body[4:])[0] == b"content"
    kind, _ = client.open(number, name.encode(), FXF_WRITE | FXF_CREAT | FXF_TRUNC, request_id=3)
    assert kind == FXP_HANDLE
    kind, body = client.request(number, FXP_OPENDIR, struct.pack("!L", 4) + NS(b"/"))
    kind, body = client.request(number, FXP_READDIR, struct.pack("!L", 5) + NS(getNS(body[4:])[0]))
    assert kind == FXP_NAME and NS(name.encode()) in body
    kind, body = client.request(number, FXP_REMOVE, struct.pack("!L", 6) + NS(name.encode()))
    assert kind == FXP_STATUS and status_of(body)[0] == 0
    assert not os.path.exists(os.path.join(home, name))


def test_exclusive_create_of_a_name_with_control_characters_is_refused(home):
    """O_EXCL means "create": refused for such a name even when a file of that name exists."""
    with open(os.path.join(home, "x\ny"), "wb"):
        pass
    client = Client(home)
    number = client.open_sftp()
    kind, body = client.open(number, b"x\ny", FXF_WRITE | FXF_CREAT | 0x20)
    assert kind == FXP_STATUS and status_of(body)[0] == FX_BAD_MESSAGE


# -- offsets and sizes out of range --------------------------------------------------


@pytest.mark.parametrize("offset", [2**63, 2**64 - 1])
def test_offsets_and_sizes_past_two_to_the_63_are_a_plain_failure(home, offset):
    """READ, WRITE, FSETSTAT and SETSTAT with a 64-bit value the system cannot take: a failure, nothing logged as ours."""
    from twisted.logger import LogLevel, capturedLogs

    client = Client(home)
    number = client.open_sftp()
    kind, handle = client.open(number, b"big.bin", FXF_READ | FXF_WRITE)
    assert kind == FXP_HANDLE
    size = struct.pack("!LQ", FILEXFER_ATTR_SIZE, offset)
    requests = [
        (FXP_READ, NS(handle) + struct.pack("!QL", offset, 10)),
        (FXP_WRITE, NS(handle) + struct.pack("!Q", offset) + NS(b"data")),
        (FXP_FSETSTAT, NS(handle) + size),
        (FXP_SETSTAT, NS(b"big.bin") + size),
    ]
    with capturedLogs() as events:
        for request_id, (kind, payload) in enumerate(requests, start=2):
            answer, body = client.request(number, kind, struct.pack("!L", request_id) + payload)
            assert answer == FXP_STATUS
            assert status_of(body) == (FX_FAILURE, "offset or size out of range")
    assert [event for event in events if event["log_level"] >= LogLevel.error] == []
    assert os.path.getsize(os.path.join(home, "big.bin")) == 4 * 1024 * 1024


def test_permission_bits_alone_need_only_allow_write(home):
    """chmod after an upload to a drop box (allow-write only) is accepted and ignored, as with full control."""
    client = Client(home, permissions={Permission.WRITE})
    number = client.open_sftp()
    mode = struct.pack("!LL", FILEXFER_ATTR_PERMISSIONS, 0o600)
    before = os.stat(os.path.join(home, "big.bin")).st_mode
    kind, body = client.request(number, FXP_SETSTAT, struct.pack("!L", 2) + NS(b"big.bin") + mode)
    assert kind == FXP_STATUS and status_of(body)[0] == FX_OK
    assert os.stat(os.path.join(home, "big.bin")).st_mode == before
    kind, body = client.request(number, FXP_SETSTAT, struct.pack("!L", 3) + NS(b"missing") + mode)
    assert kind == FXP_STATUS and status_of(body)[0] == 2  # FX_NO_SUCH_FILE


def test_chmod_by_handle_is_refused_as_chmod_by_path_and_both_are_logged(home, log_lines):
    """A read-only user's setstat of permission bits is refused by path and by handle alike (it was OK by handle)."""
    client = Client(home, permissions={Permission.READ}, log_as="sftp reader")
    number = client.open_sftp()
    mode = struct.pack("!LL", FILEXFER_ATTR_PERMISSIONS, 0o600)
    kind, handle = client.open(number, b"big.bin")
    assert kind == FXP_HANDLE
    by_path = client.request(number, FXP_SETSTAT, struct.pack("!L", 2) + NS(b"big.bin") + mode)
    by_handle = client.request(number, FXP_FSETSTAT, struct.pack("!L", 3) + NS(handle) + mode)
    for kind, body in (by_path, by_handle):
        assert kind == FXP_STATUS
        assert status_of(body) == (FX_PERMISSION_DENIED, "permission denied: allow-write is not granted")
    refusal = "sftp reader: set permissions or owner (ignored) /big.bin refused: permission denied: allow-write is not granted"
    assert [line for line in log_lines if line.startswith("sftp reader:")] == [refusal, refusal]


def test_a_truncate_of_a_handle_opened_for_reading_is_refused_and_logged(home, log_lines):
    client = Client(home, log_as="sftp alice")
    number = client.open_sftp()
    kind, handle = client.open(number, b"big.bin")
    size = struct.pack("!LQ", FILEXFER_ATTR_SIZE, 0)
    kind, body = client.request(number, FXP_FSETSTAT, struct.pack("!L", 2) + NS(handle) + size)
    assert kind == FXP_STATUS and status_of(body) == (FX_PERMISSION_DENIED, "the file was not opened for writing")
    assert os.path.getsize(os.path.join(home, "big.bin")) == 4 * 1024 * 1024
    assert [line for line in log_lines if line.startswith("sftp alice:")] == [
        "sftp alice: truncate to 0 bytes /big.bin refused: the file was not opened for writing"
    ]


def write_request(request_id: int, handle: bytes, offset: int, data: bytes) -> bytes:
    return struct.pack("!L", request_id) + NS(handle) + struct.pack("!Q", offset) + NS(data)


def test_a_full_disk_fails_each_write_and_is_logged_once_with_the_bytes_written(home, log_lines, monkeypatch):
    """Every write on a full disk answers the reason; the server log says once why, and how far the handle got."""
    client = Client(home, log_as="sftp alice")
    number = client.open_sftp()
    kind, handle = client.open(number, b"new.bin", FXF_WRITE | FXF_CREAT | FXF_TRUNC)
    assert kind == FXP_HANDLE
    kind, body = client.request(number, FXP_WRITE, write_request(2, handle, 0, b"12345"))
    assert kind == FXP_STATUS and status_of(body)[0] == FX_OK

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")  # ENOSPC

    monkeypatch.setattr(os, "pwrite", full)
    for request_id, offset in ((3, 5), (4, 10)):
        kind, body = client.request(number, FXP_WRITE, write_request(request_id, handle, offset, b"67890"))
        assert kind == FXP_STATUS and status_of(body) == (FX_FAILURE, "No space left on device")
    assert [line for line in log_lines if line.startswith("sftp alice:") and "failed" in line] == [
        "sftp alice: writing /new.bin failed after 5 bytes: No space left on device"
    ]


# -- order of pipelined requests -------------------------------------------------------

FXP_STAT, FXP_EXTENDED = 17, 200
FILEXFER_ATTR_ACMODTIME = 0x08


def status_request(kind: int, request_id: int, *names: bytes, rest: bytes = b"") -> bytes:
    return sftp_packet(kind, struct.pack("!L", request_id) + b"".join(NS(name) for name in names) + rest)


def statuses(answers: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    """(request id, status code) of each STATUS answer, in the order received."""
    return [(struct.unpack("!L", body[:4])[0], status_of(body)[0]) for kind, body in answers if kind == FXP_STATUS]


def test_pipelined_path_requests_run_one_at_a_time_in_the_order_sent(home):
    """QA, session 29: lftp's ``mkdir -p`` sends MKDIR a, a/b, a/b/c without waiting; they ran side by side in
    the thread pool, and a/b/c failed (no such folder) whenever its thread ran first. As OpenSSH's
    sftp-server, the result is now that of the requests sent one at a time, however the threads run."""
    client = Client(home)
    number = client.open_sftp()
    names = [b"a", b"a/b", b"a/b/c", b"a/b/c/d"]
    client.send(number, b"".join(status_request(FXP_MKDIR, 10 + index, name, rest=struct.pack("!L", 0))
                                 for index, name in enumerate(names)))
    assert len(client.threads.jobs) == 1  # the others wait for the first one's answer
    client.threads.run_all(newest_first=True)
    assert statuses(client.answers(number)) == [(10 + index, FX_OK) for index in range(len(names))]
    assert os.path.isdir(os.path.join(home, "a", "b", "c", "d"))
    # ...and back down, deepest first (lftp's rm -r)
    client.send(number, b"".join(status_request(FXP_RMDIR, 20 + index, name) for index, name in enumerate(reversed(names))))
    client.threads.run_all(newest_first=True)
    assert statuses(client.answers(number)) == [(20 + index, FX_OK) for index in range(len(names))]
    assert not os.path.exists(os.path.join(home, "a"))


def test_an_upload_to_a_temporary_name_pipelined_to_its_rename_keeps_its_time(home):
    """WinSCP's upload: WRITEs, CLOSE, SETSTAT (the time kept), rename over the final name, STAT, without waiting."""
    client = Client(home)
    number = client.open_sftp()
    _, handle = client.open(number, b"report.filepart", flags=FXF_WRITE | FXF_CREAT | FXF_TRUNC)
    times = struct.pack("!LLL", FILEXFER_ATTR_ACMODTIME, 1_000_000_000, 1_000_000_000)
    client.send(number, b"".join([
        sftp_packet(FXP_WRITE, write_request(30, handle, 0, b"first ")),
        sftp_packet(FXP_WRITE, write_request(31, handle, 6, b"second")),
        status_request(FXP_CLOSE, 32, handle),
        status_request(FXP_SETSTAT, 33, b"report.filepart", rest=times),
        status_request(FXP_EXTENDED, 34, b"posix-rename@openssh.com", b"report.filepart", b"report.txt"),
        status_request(FXP_STAT, 35, b"report.txt"),
    ]))
    client.threads.run_all(newest_first=True)
    answers = client.answers(number)
    assert statuses(answers) == [(30, FX_OK), (31, FX_OK), (32, FX_OK), (33, FX_OK), (34, FX_OK)]
    assert answers[-1][0] == FXP_ATTRS and struct.unpack("!L", answers[-1][1][:4])[0] == 35
    final = os.path.join(home, "report.txt")
    assert open(final, "rb").read() == b"first second"
    assert os.stat(final).st_mtime == 1_000_000_000
    assert not os.path.exists(os.path.join(home, "report.filepart"))


def test_requests_on_open_handles_still_run_side_by_side_and_a_path_request_waits_for_them(home):
    """Reads of two files are worked on at once (a lock per file keeps each file's own order); a MKDIR sent after
    them starts once both are answered, and a read sent after the MKDIR waits for it."""
    (open(os.path.join(home, "small.bin"), "wb")).write(b"x" * 1000)
    client = Client(home)
    number = client.open_sftp()
    _, big = client.open(number, b"big.bin", request_id=1)
    _, small = client.open(number, b"small.bin", request_id=2)
    client.send(number, read_request(40, big, 0, 1000) + read_request(41, small, 0, 1000)
                + status_request(FXP_MKDIR, 42, b"later", rest=struct.pack("!L", 0)) + read_request(43, small, 0, 10))
    assert len(client.threads.jobs) == 2  # both reads, not the MKDIR
    client.threads.run_one()
    client.threads.run_one()
    assert len(client.threads.jobs) == 1  # now the MKDIR, alone
    client.threads.run_one()
    assert len(client.threads.jobs) == 1  # then the last read
    client.threads.run_all()
    answers = client.answers(number)
    assert [struct.unpack("!L", body[:4])[0] for _, body in answers] == [40, 41, 42, 43]


def test_the_end_of_a_file_is_said_as_end_of_file_not_as_a_failure(home):
    """QA, session 29: READ at the end of a file answered EOF with the text "read failed"."""
    (open(os.path.join(home, "short.txt"), "wb")).write(b"abc")
    client = Client(home)
    number = client.open_sftp()
    _, handle = client.open(number, b"short.txt")
    kind, body = client.request(number, FXP_READ, struct.pack("!L", 50) + NS(handle) + struct.pack("!QL", 3, 100))
    assert kind == FXP_STATUS and status_of(body) == (FX_EOF, "End of file")
