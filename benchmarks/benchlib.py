"""Shared pieces of the login and idle-session benchmarks (not tests).

A real slapd (``tests/integration/slapd.py``) with N generated users and a
real ``twistd -n sftpauth`` (``tests/integration/server.py``) with an FTP and
an SFTP service and one LDAP method; small clients: a raw-BER asyncio LDAP
client (the floor), an asyncio FTP client, and for SFTP libssh2
(ssh2-python: every connection of a cell in one thread, the default of the
login benchmark, or blocking in a thread each) or paramiko.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import os
import resource
import socket
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from tests.integration.server import SftpauthServer, free_port  # noqa: E402
from tests.integration.slapd import SlapdServer  # noqa: E402

BASE = "dc=example,dc=com"
PEOPLE = f"ou=people,{BASE}"
OUS = ("Engineering", "Accounting")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# directory
# --------------------------------------------------------------------------

def username(index: int) -> str:
    return f"user{index:05d}"


def password(index: int) -> str:
    return f"pass-{index:05d}"


def user_dn(index: int) -> str:
    return f"uid={username(index)},ou={OUS[index % 2]},{PEOPLE}"


def ssha(secret: str, index: int) -> str:
    salt = index.to_bytes(4, "big") + b"bnch"
    digest = hashlib.sha1(secret.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def users_ldif(count: int) -> str:
    parts = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
    ]
    parts += [f"dn: ou={ou},{PEOPLE}\nobjectClass: organizationalUnit\nou: {ou}\n" for ou in OUS]
    for index in range(count):
        name = username(index)
        parts.append(
            f"dn: {user_dn(index)}\nobjectClass: inetOrgPerson\nuid: {name}\ncn: Bench {name}\n"
            f"sn: {name}\nmail: {name}@example.com\nuserPassword: {ssha(password(index), index)}\n"
        )
    return "\n".join(parts)


def start_slapd(users: int) -> SlapdServer:
    slapd = SlapdServer().start()
    started = time.monotonic()
    text = users_ldif(users)
    # ldapadd in chunks keeps each command's input reasonable
    chunk = 2000
    entries = text.split("\n\n")
    for first in range(0, len(entries), chunk):
        slapd.add_ldif("\n\n".join(entries[first:first + chunk]) + "\n")
    print(f"slapd {slapd.url}: {users} users loaded in {time.monotonic() - started:.1f}s", flush=True)
    return slapd


# --------------------------------------------------------------------------
# sftpauth
# --------------------------------------------------------------------------

def sftpauth_config(folder: Path, slapd: SlapdServer, bind_type: str, ftp_port: int, sftp_port: int,
                    idle_timeout: int = 300, workers: int = 1) -> str:
    if bind_type == "search":
        method = f"""bind_dn_type = search
bind_dn = {PEOPLE}
service_account_dn = {slapd.admin_dn}
service_account_password = {slapd.admin_password}"""
    else:
        method = f"""bind_dn_type = parent
bind_dn =
    ou={OUS[0]},{PEOPLE}
    ou={OUS[1]},{PEOPLE}"""
    return f"""
[server]
authentications = DIRECTORY
audit_log = {folder}/audit.jsonl
data_folder = {folder}/data
workers = {workers}

[services/ftp]
type = ftp
address = 127.0.0.1
port = {ftp_port}
idle_connection_timeout = {idle_timeout}
maximum_concurrent_connections = 100000

[services/sftp]
type = ssh
address = 127.0.0.1
port = {sftp_port}

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 0

[authentications/DIRECTORY]
type = ldap
address = 127.0.0.1
port = {slapd.port}
timeout = 10
{method}
username_attribute = uid
email_attribute = mail
full_name_attribute = cn
base_groups = bench

[groups/bench]
home_folder_path = {folder}/homes
create_home_folder = yes
"""


def raise_nofile(wanted: int = 65536) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE (children, e.g. twistd, inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def start_sftpauth(folder: Path, slapd: SlapdServer, bind_type: str, idle_timeout: int = 300, workers: int = 1):
    ftp_port, sftp_port = free_port(), free_port()
    server = SftpauthServer(folder, sftpauth_config(folder, slapd, bind_type, ftp_port, sftp_port, idle_timeout,
                                                    workers),
                            ports=(ftp_port, sftp_port))
    server.start(timeout=60)
    if workers > 1:  # the parent's sockets accept at once; wait until every worker serves them
        server.ready_workers(workers, timeout=60)
    return server, ftp_port, sftp_port


def tree_cpu_seconds(pid: int, children=()) -> float:
    """utime + stime of ``pid`` and of ``children`` (sftpauth's workers: ``SftpauthServer.worker_pids()``)."""
    total = 0.0
    for member in (pid, *children):
        try:
            total += cpu_seconds(member)
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not its children), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def max_open_files(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return " ".join(line.split()[3:5])
    return "?"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------
# a minimal raw-BER LDAP client (asyncio): the floor
# --------------------------------------------------------------------------

def _length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    body = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _length(len(body)) + body


def _int(tag: int, value: int) -> bytes:
    return _tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def _message(message_id: int, op: bytes) -> bytes:
    return _tlv(0x30, _int(0x02, message_id) + op)


def bind_request(message_id: int, dn: str, secret: str) -> bytes:
    body = _int(0x02, 3) + _tlv(0x04, dn.encode()) + _tlv(0x80, secret.encode())
    return _message(message_id, _tlv(0x60, body))


def search_request(message_id: int, base: str, scope: int, ldap_filter: bytes, attributes=()) -> bytes:
    body = (_tlv(0x04, base.encode()) + _int(0x0A, scope) + _int(0x0A, 0) + _int(0x02, 2) + _int(0x02, 10)
            + _tlv(0x01, b"\x00") + ldap_filter
            + _tlv(0x30, b"".join(_tlv(0x04, a.encode()) for a in attributes)))
    return _message(message_id, _tlv(0x63, body))


def equality(attribute: str, value: str) -> bytes:
    return _tlv(0xA3, _tlv(0x04, attribute.encode()) + _tlv(0x04, value.encode()))


PRESENT_OBJECTCLASS = _tlv(0x87, b"objectClass")
UNBIND = _message(0x7FFF, b"\x42\x00")


def _read_header(data: bytes, position: int) -> tuple[int, int, int]:
    """(tag, content start, content length) of the TLV at position."""
    tag = data[position]
    first = data[position + 1]
    if first < 0x80:
        return tag, position + 2, first
    count = first & 0x7F
    return tag, position + 2 + count, int.from_bytes(data[position + 2:position + 2 + count], "big")


async def read_message(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(protocolOp tag, result code or -1, raw) of the next LDAPMessage."""
    head = await reader.readexactly(2)
    if head[1] < 0x80:
        size = head[1]
        extra = b""
    else:
        extra = await reader.readexactly(head[1] & 0x7F)
        size = int.from_bytes(extra, "big")
    body = await reader.readexactly(size)
    _, start, length = _read_header(body, 0)  # messageID
    op_tag, op_start, _ = _read_header(body, start + length)
    code = -1
    if op_tag in (0x61, 0x65):  # BindResponse, SearchResultDone: resultCode ENUMERATED first
        _, code_start, code_length = _read_header(body, op_start)
        code = int.from_bytes(body[code_start:code_start + code_length], "big")
    return op_tag, code, body


async def ldap_search(reader, writer, message_id: int, request: bytes) -> tuple[int, list[bytes]]:
    writer.write(request)
    entries = []
    while True:
        tag, code, body = await read_message(reader)
        if tag == 0x64:
            entries.append(body)
        elif tag == 0x65:
            return code, entries


def source_address(worker: int | None) -> str | None:
    """A distinct loopback source address per client worker (None: the default, 127.0.0.1).

    sftpauth runs at most two logins of one source address at once (policy.LoginSlots), so clients
    standing for many users must come from many addresses."""
    if worker is None:
        return None
    return f"127.0.{1 + worker // 250}.{1 + worker % 250}"


def _local(source: str | None):
    return (source, 0) if source else None


async def floor_login(host: str, port: int, index: int, bind_type: str, admin: tuple[str, str],
                      source: str | None = None) -> None:
    """What one sftpauth LDAP login needs, as directly as possible: connect, (service BIND + search),
    BIND as the user, read the entry, UNBIND."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=_local(source))
    try:
        dn = user_dn(index)
        if bind_type == "search":
            writer.write(bind_request(1, *admin))
            _, code, _ = await read_message(reader)
            if code != 0:
                raise RuntimeError(f"service bind {code}")
            code, entries = await ldap_search(reader, writer, 2, search_request(
                2, PEOPLE, 2, equality("uid", username(index)), ("1.1",)))
            if code != 0 or len(entries) != 1:
                raise RuntimeError(f"search {code} {len(entries)}")
        writer.write(bind_request(3, dn, password(index)))
        _, code, _ = await read_message(reader)
        if code != 0:
            raise RuntimeError(f"bind {code}")
        code, entries = await ldap_search(reader, writer, 4, search_request(4, dn, 0, PRESENT_OBJECTCLASS))
        if code != 0 or len(entries) != 1:
            raise RuntimeError(f"read {code}")
        writer.write(UNBIND)
    finally:
        writer.close()


# --------------------------------------------------------------------------
# FTP (asyncio)
# --------------------------------------------------------------------------

class FTPError(RuntimeError):
    pass


async def ftp_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    line = (await reader.readline()).decode("utf-8", "replace")
    if len(line) < 4:
        raise FTPError(f"connection closed: {line!r}")
    code = line[:3]
    if line[3] == "-":
        while True:
            more = (await reader.readline()).decode("utf-8", "replace")
            if not more:
                raise FTPError("connection closed in a multi-line reply")
            if more.startswith(code + " "):
                break
    return int(code), line


async def ftp_command(reader, writer, command: str, expected: int) -> str:
    writer.write(command.encode() + b"\r\n")
    code, line = await ftp_reply(reader)
    if code != expected:
        raise FTPError(f"{command.split()[0]}: {line.strip()}")
    return line


async def ftp_open(host: str, port: int, index: int, source: str | None = None):
    """Connect and log in; returns (reader, writer)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=_local(source))
    try:
        code, line = await ftp_reply(reader)
        if code != 220:
            raise FTPError(f"banner {line.strip()}")
        await ftp_command(reader, writer, f"USER {username(index)}", 331)
        await ftp_command(reader, writer, f"PASS {password(index)}", 230)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def ftp_login(host: str, port: int, index: int, source: str | None = None) -> None:
    reader, writer = await ftp_open(host, port, index, source)
    try:
        await ftp_command(reader, writer, "PWD", 257)
        await ftp_command(reader, writer, "QUIT", 221)
    finally:
        writer.close()


# --------------------------------------------------------------------------
# SFTP (blocking: run in threads)
# --------------------------------------------------------------------------

def _client_socket(host: str, port: int, source: str | None, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout, source_address=_local(source))
    # Without TCP_NODELAY every key exchange round trip waits ~40 ms for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def sftp_login_libssh2(host: str, port: int, index: int, source: str | None = None, timeout: float = 60.0) -> None:
    """One SFTP login with libssh2 (ssh2-python): about 1 ms of client CPU, against paramiko's 5-7 ms.

    libssh2 releases the GIL while it waits, so the threads of a cell overlap.
    The SFTP handles and the session are freed *before* the socket is closed:
    freeing an SFTP handle sends its channel close on the session's file
    descriptor, and once the socket is closed another thread's new connection
    may already have that descriptor number (seen: encrypted bytes arriving
    before a new connection's SSH banner, ~0.5% of logins at concurrency 32).
    """
    from ssh2.session import Session

    sock = _client_socket(host, port, source, timeout)
    session = sftp = listing = None
    try:
        session = Session()
        session.set_timeout(int(timeout * 1000))
        session.handshake(sock)
        session.userauth_password(username(index), password(index))
        sftp = session.sftp_init()
        listing = sftp.opendir(".")
        for _ in listing.readdir():
            pass
        listing.close()
        session.disconnect()
    finally:
        listing = sftp = session = None  # freed before the socket closes (see above), on errors too
        sock.close()


def _libssh2_login_steps(host: str, port: int, index: int, source: str | None):
    """One libssh2 SFTP login in non-blocking mode, as a generator for :func:`run_libssh2_cell`.

    The same steps as :func:`sftp_login_libssh2`. Wherever libssh2 (or the
    connect) would block, it yields ``(socket, selector events)`` and is
    resumed when the socket is ready.
    """
    import selectors

    from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN as again
    from ssh2.session import LIBSSH2_SESSION_BLOCK_INBOUND, LIBSSH2_SESSION_BLOCK_OUTBOUND, Session

    def wanted(session) -> int:
        directions = session.block_directions()
        events = selectors.EVENT_READ if directions & LIBSSH2_SESSION_BLOCK_INBOUND else 0
        if directions & LIBSSH2_SESSION_BLOCK_OUTBOUND:
            events |= selectors.EVENT_WRITE
        return events or selectors.EVENT_READ

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    session = sftp = listing = None
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see _client_socket
        if source:
            sock.bind((source, 0))
        code = sock.connect_ex((host, port))
        if code == errno.EINPROGRESS:
            yield sock, selectors.EVENT_WRITE
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, f"connect: {os.strerror(code)}")
        session = Session()
        session.set_blocking(False)
        while session.handshake(sock) == again:
            yield sock, wanted(session)
        while session.userauth_password(username(index), password(index)) == again:
            yield sock, wanted(session)
        while (sftp := session.sftp_init()) == again:
            yield sock, wanted(session)
        while (listing := sftp.opendir(".")) == again:
            yield sock, wanted(session)
        # One name per call: > 0 a name, 0 the end. Not readdir(): its generator, in non-blocking
        # mode, never returns past an EAGAIN (seen with ssh2-python 1.2.0).
        while (code := listing._readdir(1024)[0]) != 0:
            if code == again:
                yield sock, wanted(session)
            elif code < 0:
                break
        if code < 0:
            raise RuntimeError(f"readdir failed: libssh2 error {code}")
        while listing.close() == again:
            yield sock, wanted(session)
        while session.disconnect() == again:
            yield sock, wanted(session)
    finally:
        listing = sftp = session = None  # freed before the socket closes (see sftp_login_libssh2)
        sock.close()


def run_libssh2_cell(cell, host: str, port: int, concurrency: int, sources: bool, timeout: float = 60.0) -> None:
    """Run a cell's SFTP logins with libssh2, ``concurrency`` at a time, all in this one thread.

    ``cell`` hands out user indexes (``take()``: None when the cell is over)
    and counts results (``record(started, error)``). Each login is a
    :func:`_libssh2_login_steps` generator driven by one selector: no thread
    per connection, so no thread switch at each packet (with 32 threads the
    client spent about 0.2-0.4 ms more CPU per login, a sixth of it).
    A login that takes over ``timeout`` seconds fails with TimeoutError.
    """
    import selectors

    selector = selectors.DefaultSelector()
    running: dict[int, list] = {}  # slot -> [steps, started, socket, events]
    free = list(range(concurrency))  # slots whose next login is still to start

    def finish(slot: int, error: BaseException | None) -> None:
        steps, started, sock, _ = running.pop(slot)
        if sock is not None:
            selector.unregister(sock)
        if error is not None:
            steps.close()  # runs its finally: frees the session, closes the socket
        cell.record(started, error)
        free.append(slot)

    def advance(slot: int) -> None:
        login = running[slot]
        try:
            sock, events = next(login[0])
        except StopIteration:
            finish(slot, None)
            return
        except Exception as error:  # noqa: BLE001 - counted as a failure
            finish(slot, error)
            return
        if login[2] is None:
            selector.register(sock, events, slot)
        elif events != login[3]:
            selector.modify(sock, events, slot)
        login[2], login[3] = sock, events

    while True:
        while free:
            index = cell.take()
            if index is None:
                free.clear()
                break
            slot = free.pop()
            steps = _libssh2_login_steps(host, port, index, source_address(slot) if sources else None)
            running[slot] = [steps, time.monotonic(), None, 0]
            advance(slot)
        if not running:
            break
        for key, _ in selector.select(1.0):
            advance(key.data)
        now = time.monotonic()
        for slot in [slot for slot, login in running.items() if now - login[1] > timeout]:
            finish(slot, TimeoutError(f"no answer within {timeout:.0f} s"))
    selector.close()


def sftp_open(host: str, port: int, index: int, source: str | None = None, timeout: float = 60.0):
    import paramiko

    sock = _client_socket(host, port, source, timeout)
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout
    transport.auth_timeout = timeout
    try:
        transport.connect(username=username(index), password=password(index))
        client = paramiko.SFTPClient.from_transport(transport)
        client.get_channel().settimeout(timeout)
    except BaseException:
        transport.close()
        raise
    return transport, client


def sftp_login(host: str, port: int, index: int, source: str | None = None) -> None:
    transport, client = sftp_open(host, port, index, source)
    try:
        client.listdir(".")
        client.close()
    finally:
        transport.close()


# One login each (warm-up, and the cells of the thread-per-connection clients); the login benchmark
# runs the cells of "libssh2" with run_libssh2_cell.
SFTP_CLIENTS = {"libssh2": sftp_login_libssh2, "libssh2-threads": sftp_login_libssh2, "paramiko": sftp_login}
