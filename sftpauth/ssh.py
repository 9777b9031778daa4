"""The SSH service (``type = ssh`` or ``sftp``): SFTP only, locked in the home folder.

Password and keyboard-interactive logins go through the one portal
(:class:`LoginRequest`), so the authentication chain, the audit log and the
realm are the same as for FTP. Keyboard-interactive asks
``keyboard_interactive_message``, then ``Verification code:`` when the chain
says the username's method wants a code appended (TOTP); see
:class:`KeyboardInteractive`.
After login the client gets ``session`` channels that accept exactly one
thing, the ``sftp`` subsystem; shells, commands, port forwarding, X11 and
agent forwarding are refused with a protocol-level failure.

Choices made where the SPEC is silent:

- ``setstat``/``fsetstat`` change the size (truncate) and the access and
  modification times (with the ``allow-write`` permission; ``fsetstat`` of a
  size only on a handle opened for writing). OpenSSH's ``scp`` overwrites a
  file by writing it and then truncating it to what it wrote. Permission
  bits and ownership are accepted and ignored (files are created 0644,
  folders 0755, minus the process umask): clients such as ``sftp put -p``
  keep working and no client can make world-writable files.
- OpenSSH's extensions ``posix-rename``, ``statvfs``, ``fstatvfs``,
  ``fsync`` and ``limits`` (see :data:`SFTP_EXTENSIONS`); ``hardlink`` is
  not offered (as symbolic links are not made).
- When the client ends the session (EOF), the channel sends ``exit-status``
  0 before it closes, as sshd does when sftp-server exits; ``scp`` and
  ``ssh -s`` take their exit code from it.
- Symbolic links are never created or read through SFTP (permission
  denied). A link planted on disk that stays inside the home folder is
  shown as what it points to; one that leads outside is hidden from
  listings and answers "no such file".
- ``rename`` never replaces an existing target (SFTP v3 semantics);
  ``posix-rename@openssh.com`` does, as FTP's ``RNTO``.
- ``realpath`` is lexical: the answer is always the session's own view
  (``/`` is the home folder), never a path on the server's disk.
- Host keys: ``ssh_server_keys``, or Ed25519 + RSA-3072 keys generated once
  into ``<data_folder>/ssh/`` (0600 in a 0700 folder) and reused.
- At most :data:`MAX_PASSWORD_ATTEMPTS` failed logins per connection, one
  second apart; a connection must log in within
  :data:`LOGIN_GRACE_SECONDS`; ``idle_connection_timeout`` closes a
  connection that sent nothing for that long.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat as stat_module
import struct
import time
from collections import deque
from typing import Any, Callable, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.application.service import IService
from twisted.conch import error as conch_error
from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser, ISFTPFile, ISFTPServer
from twisted.conch.ssh import connection, factory, keys, session, transport, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.filetransfer import (
    FILEXFER_ATTR_ACMODTIME,
    FILEXFER_ATTR_PERMISSIONS,
    FILEXFER_ATTR_SIZE,
    FileTransferBase,
    FileTransferServer,
    FX_BAD_MESSAGE,
    FX_EOF,
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_OK,
    FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_CLOSE,
    FXP_EXTENDED_REPLY,
    FXP_FSETSTAT,
    FXP_FSTAT,
    FXP_HANDLE,
    FXP_INIT,
    FXP_NAME,
    FXP_READ,
    FXP_READDIR,
    FXP_VERSION,
    FXP_WRITE,
    SFTPError,
)
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from sftpauth.account import Account
from sftpauth.auth.chain import SecondFactor
from sftpauth.auth.credentials import ILoginRequest, LoginRequest
from sftpauth.auth.policy import answer_failure, plain_address
from sftpauth.config.errors import ConfigError, ConfigProblem
from sftpauth.config.models import SSHServiceSettings
from sftpauth.filesystem import (
    CONTROL_CHARACTERS,
    MONTHS,
    FolderReader,
    InvalidPath,
    JailedFilesystem,
    Listed,
    OutsideJail,
    attribute_change,
    change_attributes,
    describe_failure,
    disk_bytes,
    printable,
    virtual_path,
)
from sftpauth.private_files import write_private_file
from sftpauth.listening import LOGIN_GRACE_SECONDS, listening_service
from sftpauth.permissions import Permission, PermissionDenied
from sftpauth.realm import SessionInfo
from sftpauth.runtime import Runtime

_log = Logger()

MAX_PASSWORD_ATTEMPTS = 6  # failed password logins on one connection, then disconnect
MAX_QUEUED_AUTH_REQUESTS = 8  # requests sent while one is being checked
MAX_SESSION_CHANNELS = 10  # like OpenSSH MaxSessions
# A channel's data goes out in packets of at most the size the client announces: one announcing a few
# bytes would make every reply cost a packet (MAC, cipher call, header) per few bytes. Real clients
# announce 16 KiB (PuTTY, WinSCP, FileZilla) or 32 KiB (OpenSSH, libssh2, paramiko, Go).
MIN_CLIENT_MAX_PACKET = 1024
MAX_OPEN_HANDLES = 256  # files and folders open at once on one connection, all its SFTP sessions together
MAX_SFTP_PACKET = 256 * 1024 + 1024  # OpenSSH sftp-server's limit (plus headers)
# OpenSSH's sftp refuses any answer over 256 KiB ("message too long"): a READ answer's headers must fit too.
MAX_CLIENT_MESSAGE = 256 * 1024
MAX_READ_LENGTH = MAX_CLIENT_MESSAGE - 1024  # as OpenSSH's sftp-server
MAX_WRITE_LENGTH = MAX_CLIENT_MESSAGE - 1024  # what limits@openssh.com announces (bigger WRITEs are taken)
# Flow control of one SFTP session (see SFTPSubsystem): requests being worked
# on, the reply bytes they may produce, and the unsent bytes of the channel.
MAX_PENDING_REQUESTS = 64  # OpenSSH sftp pipelines 64 requests
MAX_PENDING_REPLY_BYTES = 2 * 1024 * 1024  # 64 reads of 32 KB
OUTPUT_HIGH_WATER = 1024 * 1024  # unsent reply bytes: stop taking requests...
OUTPUT_LOW_WATER = 256 * 1024  # ...until the client has read down to this
READDIR_BATCH_ENTRIES = 250  # entries in one READDIR answer (as conch)...
READDIR_BATCH_BYTES = 64 * 1024  # ...and about this many bytes at most
# Requests on an open handle: each handle's lock keeps its own in order, so they run beside the
# requests of other handles. Every other request (a path, an extension) runs alone (SFTPSubsystem).
HANDLE_REQUESTS = frozenset({FXP_CLOSE, FXP_READ, FXP_WRITE, FXP_FSTAT, FXP_FSETSTAT, FXP_READDIR})
# OpenSSH's extensions, announced in VERSION (name: version); SFTPSubsystem.packet_EXTENDED answers them.
SFTP_EXTENSIONS = {
    b"posix-rename@openssh.com": b"1",  # rename that replaces the target (sftp's rename, FTP's RNTO)
    b"statvfs@openssh.com": b"2",  # sftp's df
    b"fstatvfs@openssh.com": b"2",
    b"fsync@openssh.com": b"1",
    b"limits@openssh.com": b"1",  # the sizes below, so clients size their reads and writes to them
}
# Algorithms offered (the first that both sides know wins): no SHA-1, CBC,
# 3DES or MD5. conch has neither AES-GCM, chacha20-poly1305 nor encrypt-then-MAC.
KEY_EXCHANGES = (
    b"mlkem768x25519-sha256",
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
)
CIPHERS = [b"aes256-ctr", b"aes192-ctr", b"aes128-ctr"]
MACS = [b"hmac-sha2-512", b"hmac-sha2-256"]
WEAK_HOST_KEY_SIGNATURES = frozenset({b"ssh-rsa", b"ssh-dss"})  # SHA-1 signatures
FILE_MODE = 0o644
VERSION_STRING = b"SSH-2.0-sftpauth"
GENERATED_KEYS_FOLDER = "ssh"
# What conch raises when it parses bytes that do not follow the protocol.
MALFORMED_INPUT_ERRORS = (struct.error, IndexError, KeyError, ValueError, conch_error.ConchError)
# Refused without an info line: OpenSSH clients send them all the time.
ROUTINE_REQUESTS = frozenset({b"env", b"keepalive@openssh.com", b"no-more-sessions@openssh.com"})


# -- host keys -----------------------------------------------------------------------


def fingerprint(key: keys.Key) -> str:
    """The key's fingerprint as OpenSSH shows it (``SHA256:`` unpadded base64)."""
    digest = hashlib.sha256(key.blob()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def load_host_keys(settings: SSHServiceSettings, config_path: str, data_folder: str) -> dict[bytes, keys.Key]:
    """Private host keys by SSH key type; configured ones, else the generated ones."""
    if settings.ssh_server_keys:
        return _configured_host_keys(settings, config_path)
    return generated_host_keys(os.path.join(data_folder, GENERATED_KEYS_FOLDER), config_path)


def _configured_host_keys(settings: SSHServiceSettings, config_path: str) -> dict[bytes, keys.Key]:
    section = f"services/{settings.id}"
    problems = []
    loaded: dict[bytes, keys.Key] = {}

    def problem(message: str) -> None:
        problems.append(ConfigProblem(config_path, None, section, "ssh_server_keys", message))

    for path in settings.ssh_server_keys:
        try:
            key = keys.Key.fromFile(path)
        except OSError as error:
            problem(f"cannot read the SSH host key {path}: {error.strerror or error}")
            continue
        except keys.EncryptedKeyError:
            problem(f"the SSH host key {path} is protected by a passphrase; give an unencrypted private key")
            continue
        except Exception:
            problem(f"{path} is not a private key in OpenSSH or PEM format")
            continue
        if key.isPublic():
            problem(f"{path} is a public key; give the private key file")
            continue
        key_type = key.sshType()
        if key_type in loaded:
            problem(f"{path} is a second {key_type.decode('ascii')} key; give one key of each type")
            continue
        if key.type() == "RSA" and key.size() < 2048:
            _log.warn("SSH host key {path} is RSA with only {bits} bits; use 3072 or more", path=path, bits=key.size())
        loaded[key_type] = key
    if problems:
        raise ConfigError(problems)
    return loaded


def generated_host_keys(folder: str, config_path: str = "") -> dict[bytes, keys.Key]:
    """Ed25519 and RSA keys kept in ``folder``, generated on the first start."""
    wanted: list[tuple[str, Callable[[], Any]]] = [
        ("ssh_host_ed25519_key", ed25519.Ed25519PrivateKey.generate),
        ("ssh_host_rsa_key", lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072)),
    ]
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError as error:
        raise ConfigError(
            [
                ConfigProblem(
                    config_path, None, "server", "data_folder",
                    f"cannot create the folder of the generated SSH host keys {folder}: {error.strerror or error}",
                )
            ]
        ) from None
    loaded: dict[bytes, keys.Key] = {}
    for name, generate in wanted:
        path = os.path.join(folder, name)
        try:
            if not os.path.exists(path):
                _write_private_key(path, generate())
                _log.info("generated the SSH host key {path}", path=path)
            key = keys.Key.fromFile(path)
        except OSError as error:
            raise ConfigError(
                [ConfigProblem(config_path, None, "server", "data_folder", f"SSH host key {path}: {error.strerror or error}")]
            ) from None
        except Exception:
            raise ConfigError(
                [
                    ConfigProblem(
                        config_path, None, "server", "data_folder",
                        f"the generated SSH host key {path} is damaged; remove it to generate a new one",
                    )
                ]
            ) from None
        loaded[key.sshType()] = key
    return loaded


def _write_private_key(path: str, private_key: Any) -> None:
    write_private_file(
        path,
        private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )


# -- errors --------------------------------------------------------------------------


def _client_name(raw: bytes, limit: int = 64) -> str:
    """A request, channel or subsystem type the client chose, for a log line (shown with ``!r``).

    Cut at ``limit`` bytes: the protocol lets a logged-in client send names
    of up to a packet's size, and a line per refusal would fill the log.
    """
    shown = raw[:limit].decode("ascii", "backslashreplace")
    return shown + "..." if len(raw) > limit else shown


def _ascii(text: str) -> str:
    # conch sends status messages with networkString(), which takes ASCII only.
    return text.encode("ascii", "backslashreplace").decode("ascii")


# The SFTP status of each kind of failure (the first that matches); any other is FX_FAILURE.
_STATUS_CODES = (
    (OutsideJail, FX_NO_SUCH_FILE),
    (FileNotFoundError, FX_NO_SUCH_FILE),
    (PermissionDenied, FX_PERMISSION_DENIED),
    (PermissionError, FX_PERMISSION_DENIED),
    (InvalidPath, FX_BAD_MESSAGE),  # and InvalidName
)


def _sftp_reason(error: BaseException) -> str:
    """A failure in words for the change log, also once :func:`sftp_error` has made it an SFTPError."""
    return error.message if isinstance(error, SFTPError) else describe_failure(error)


def sftp_error(failure: Failure) -> Failure:
    """Turn any failure of a file operation into an :class:`SFTPError`.

    Messages never carry a real path on disk (``str(OSError)`` would):
    :func:`describe_failure` words them, as the change log does. SFTP v3 has
    no FILE_ALREADY_EXISTS (OpenSSH's sftp prints "Unknown status"): an
    existing file is a failure, as sftp-server says.
    """
    error = failure.value
    if isinstance(error, SFTPError):
        return failure
    if not isinstance(error, (OutsideJail, PermissionDenied, InvalidPath, OSError, OverflowError)):
        _log.failure("unexpected error in an SFTP operation", failure=failure)
    code = next((code for kind, code in _STATUS_CODES if isinstance(error, kind)), FX_FAILURE)
    return Failure(SFTPError(code, _ascii(describe_failure(error))))


def _attributes(result: os.stat_result) -> dict[str, int]:
    """SFTP v3 attributes; no uid/gid (the server's accounts are none of the client's business)."""

    def seconds(value: float) -> int:
        return min(max(int(value), 0), 0xFFFFFFFF)

    return {
        "size": result.st_size,
        "permissions": result.st_mode,
        "atime": seconds(result.st_atime),
        "mtime": seconds(result.st_mtime),
    }


def pack_attributes(attrs: dict[str, int]) -> bytes:
    """The wire form of :func:`_attributes` (what conch's ``_packAttributes`` makes of it)."""
    return struct.pack(
        "!LQLLL",
        FILEXFER_ATTR_SIZE | FILEXFER_ATTR_PERMISSIONS | FILEXFER_ATTR_ACMODTIME,
        attrs["size"],
        attrs["permissions"],
        attrs["atime"],
        attrs["mtime"],
    )


def long_name(name: str, result: os.stat_result, owner: str, group: str, now: Optional[float] = None) -> str:
    """An ``ls -l`` line, as SFTP v3 clients show it."""
    now = time.time() if now is None else now
    moment = time.localtime(result.st_mtime)
    day = f"{MONTHS[moment.tm_mon - 1]} {moment.tm_mday:2d}"
    if abs(now - result.st_mtime) < 180 * 24 * 3600:
        when = f"{day} {moment.tm_hour:02d}:{moment.tm_min:02d}"
    else:
        when = f"{day}  {moment.tm_year}"
    mode = stat_module.filemode(result.st_mode)
    shown = CONTROL_CHARACTERS.sub("?", name)  # what a terminal prints: no line break or escape (the name field is exact)
    return f"{mode} {result.st_nlink:>4} {owner:<8} {group:<8} {result.st_size:>8} {when} {shown}"


# -- SFTP ----------------------------------------------------------------------------


def open_flags(pflags: int) -> int:
    """SFTP ``FXF_*`` open flags as ``os.O_*`` flags."""
    if pflags & FXF_READ and pflags & FXF_WRITE:
        flags = os.O_RDWR
    elif pflags & FXF_WRITE:
        flags = os.O_WRONLY
    else:
        flags = os.O_RDONLY
    if pflags & FXF_APPEND:
        flags |= os.O_APPEND
    if pflags & FXF_CREAT:
        flags |= os.O_CREAT
    if pflags & FXF_TRUNC:
        flags |= os.O_TRUNC
    if pflags & FXF_EXCL:
        flags |= os.O_EXCL
    return flags


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


@implementer(ISFTPFile)
class JailedFile:
    """An open file of a session: a raw fd, every operation in a thread.

    Operations on one file run one at a time (a :class:`DeferredLock`), so
    ``close`` never releases the descriptor while a read or write still uses
    it: a reused fd number can never serve another session's file. When the
    session ends (:meth:`abandon`), operations still waiting for the lock
    are dropped instead of run for nobody.
    """

    def __init__(self, filesystem: JailedFilesystem, fd: int, path: str, readable: bool, writable: bool):
        self._filesystem = filesystem
        self._fd: Optional[int] = fd
        self.path = path
        self._readable = readable
        self._writable = writable
        self._lock = defer.DeferredLock()
        self._abandoned = False
        self._written = 0  # bytes written through this handle (for the log line of a failed write)
        self._write_failure_logged = False

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _run(self, function: Callable[..., Any], *args: Any,
             failed: Optional[Callable[[Failure], Any]] = None) -> defer.Deferred:
        """``function(fd, *args)`` in a thread, after the file's other operations; ``failed`` sees a failure first."""
        if self._fd is None:
            return defer.fail(SFTPError(FX_FAILURE, "the file is closed"))
        fd = self._fd
        running = self._lock.run(self._runUnlessAbandoned, function, fd, *args)
        if failed is not None:
            running.addErrback(failed)
        return running.addErrback(sftp_error)

    def _runUnlessAbandoned(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self._abandoned:
            return defer.fail(SFTPError(FX_FAILURE, "the session has ended"))
        return self._filesystem.run(function, *args)

    def readChunk(self, offset: int, length: int) -> defer.Deferred:
        if not self._readable:
            return defer.fail(SFTPError(FX_PERMISSION_DENIED, "the file was not opened for reading"))
        return self._run(os.pread, min(length, MAX_READ_LENGTH), offset)

    def writeChunk(self, offset: int, data: bytes) -> defer.Deferred:
        if not self._writable:
            return defer.fail(SFTPError(FX_PERMISSION_DENIED, "the file was not opened for writing"))
        return self._run(_pwrite_all, data, offset, failed=self._write_failed).addCallback(self._wrote, len(data))

    def _wrote(self, result: None, size: int) -> None:
        self._written += size

    def _write_failed(self, failure: Failure) -> Failure:
        # One warning per handle: a client pipelines many writes, and each fails on a full disk.
        if failure.check(OSError) and not self._write_failure_logged:
            self._write_failure_logged = True
            self._filesystem.log_failed_write(self.path, failure.value, self._written)
        return failure

    def getAttrs(self) -> defer.Deferred:
        return self._run(os.fstat).addCallback(_attributes)

    def setAttrs(self, attrs: dict) -> defer.Deferred:
        """As setstat by path (:meth:`JailedFilesystem.set_attributes`): allow-write, even for permission bits alone."""
        size, times = _attributes_to_set(attrs)
        try:
            self._filesystem.require(Permission.WRITE, self.path)
            if size is not None and not self._writable:
                raise SFTPError(FX_PERMISSION_DENIED, "the file was not opened for writing")
        except Exception:
            d = defer.fail()
        else:
            d = self._run(change_attributes, size, times) if size is not None or times is not None else defer.succeed(None)
        logged = self._filesystem.log_change(d, attribute_change(size, times), self.path, reason_of=_sftp_reason)
        return logged.addErrback(sftp_error)

    def sync(self) -> defer.Deferred:
        """``fsync@openssh.com``: what was written is on disk when this answers."""
        return self._run(os.fsync)

    def statvfs(self) -> defer.Deferred:
        return self._run(os.fstatvfs)

    def close(self) -> defer.Deferred:
        if self._fd is None:
            return defer.succeed(None)
        fd, self._fd = self._fd, None
        return self._lock.run(self._filesystem.run, os.close, fd).addErrback(sftp_error)

    def abandon(self) -> defer.Deferred:
        """Close for a session that has ended: reads and writes not started yet are dropped."""
        self._abandoned = True
        return self.close()


def _attributes_to_set(attrs: dict) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    """The size and the (atime, mtime) to apply, each None when not asked for.

    Permission bits, uid/gid and extended attributes are ignored (see the
    module docstring).
    """
    times = (attrs["atime"], attrs["mtime"]) if "atime" in attrs and "mtime" in attrs else None
    return attrs.get("size"), times


def statvfs_reply(result: os.statvfs_result) -> bytes:
    """The ``statvfs@openssh.com`` answer: eleven uint64, as OpenSSH's sftp-server sends them."""
    flags = (1 if result.f_flag & os.ST_RDONLY else 0) | (2 if result.f_flag & os.ST_NOSUID else 0)
    return struct.pack(
        "!11Q",
        result.f_bsize,
        result.f_frsize,
        result.f_blocks,
        result.f_bfree,
        result.f_bavail,
        result.f_files,
        result.f_ffree,
        result.f_favail,
        result.f_fsid & 0xFFFFFFFFFFFFFFFF,
        flags,
        result.f_namemax,
    )


class DirectoryListing:
    """What ``openDirectory`` returns: a folder read and answered a batch at a time.

    Each batch is read from the folder (:class:`FolderReader`) and made (``ls
    -l`` lines, attributes, the packed ``FXP_NAME`` body) in a thread, one
    batch at a time: a folder of 200,000 entries costs the reactor one small
    step per READDIR, and memory for one batch, however many times it is
    open. The first batch is made in opendir's own thread trip, so a small
    folder needs no other.
    """

    def __init__(self, filesystem: JailedFilesystem, reader: FolderReader, owner: str, group: str, now: float):
        self._filesystem = filesystem
        self._reader = reader
        self._left: list[Listed] = []  # read, not sent yet (a batch has a size limit)
        self._owner, self._group, self._now = owner, group, now
        self._lock = defer.DeferredLock()
        self._ready: Optional[bytes] = None  # the first batch, made with the listing (prepared)

    def prepared(self) -> "DirectoryListing":
        """Make the first batch now, in the thread that opened the folder."""
        try:
            self._ready = self._batch()
        except EOFError:
            pass
        return self

    def nextBatch(self) -> defer.Deferred:
        """The body of the next ``FXP_NAME`` answer (count, then entries); EOFError after the last."""
        if self._ready is not None:
            ready, self._ready = self._ready, None
            return defer.succeed(ready)
        if not self._lock.locked and self._reader.finished and not self._left:
            return defer.fail(EOFError())  # no batch in flight could still come before it
        return self._lock.run(self._filesystem.run, self._batch)

    def _batch(self) -> bytes:
        # In a thread, one at a time (the lock): reads the folder on.
        parts: list[bytes] = []
        size = 0
        while len(parts) < READDIR_BATCH_ENTRIES and size < READDIR_BATCH_BYTES:
            if not self._left:
                self._left = self._reader.read(READDIR_BATCH_ENTRIES - len(parts))
                if not self._left:
                    break
                self._left.reverse()  # taken from the end, in the folder's order
            name, result, _ = self._left.pop()  # a symlink is listed as one (no "-> target", as sftp-server)
            line = long_name(name, result, self._owner, self._group, self._now)
            part = NS(disk_bytes(name)) + NS(disk_bytes(line)) + pack_attributes(_attributes(result))
            parts.append(part)
            size += len(part)
        if not parts:
            raise EOFError()
        return struct.pack("!L", len(parts)) + b"".join(parts)

    def close(self) -> defer.Deferred:
        """Close the folder, after the batch being made (if any).

        A folder read to its end is closed already (:meth:`FolderReader.read`):
        nothing is left to do in a thread, and a small folder's listing costs
        one thread trip in all, opendir's.
        """
        self._ready = None
        if not self._lock.locked and self._reader.finished:
            self._close()
            return defer.succeed(None)
        return self._lock.run(self._filesystem.run, self._close)

    def _close(self) -> None:
        self._left = []
        self._reader.close()


@implementer(ISFTPServer)
class JailedSFTPServer:
    """The file operations of one SFTP session, all through :class:`JailedFilesystem`."""

    def __init__(self, avatar: "SFTPUser"):
        self.avatar = avatar
        self.filesystem = avatar.filesystem

    def gotVersion(self, otherVersion: int, extData: dict) -> dict:
        return dict(SFTP_EXTENSIONS)

    def openFile(self, filename: bytes, flags: int, attrs: dict) -> defer.Deferred:
        os_flags = open_flags(flags)
        writable = bool(flags & FXF_WRITE)
        readable = bool(flags & FXF_READ) or not writable
        try:
            path = virtual_path(filename)
            self.avatar.reserveHandle()
        except Exception:
            return defer.fail(sftp_error(Failure()))
        # The jail refuses a new name with control characters (an existing file may be opened).
        # The path as sent: "name/" is not the file "name" (filesystem.names_a_folder).
        d = self.filesystem.open_file(filename, os_flags, FILE_MODE).addBoth(self.avatar.releaseHandle)
        d.addCallback(lambda fd: JailedFile(self.filesystem, fd, path, readable, writable))
        return d.addErrback(sftp_error)

    def removeFile(self, filename: bytes) -> defer.Deferred:
        return self.filesystem.remove_file(filename).addErrback(sftp_error)

    def renameFile(self, oldpath: bytes, newpath: bytes, overwrite: bool = False) -> defer.Deferred:
        """SFTP v3 ``rename`` never replaces a file; ``posix-rename@openssh.com`` does (``overwrite``)."""
        return self.filesystem.rename(oldpath, newpath, overwrite=overwrite).addErrback(sftp_error)

    def makeDirectory(self, path: bytes, attrs: dict) -> defer.Deferred:
        return self.filesystem.make_directory(path).addErrback(sftp_error)

    def removeDirectory(self, path: bytes) -> defer.Deferred:
        return self.filesystem.remove_directory(path).addErrback(sftp_error)

    def openDirectory(self, path: bytes) -> defer.Deferred:
        # One trip to a thread: a file is "not a folder" here (FTP LIST lists it as itself).
        try:
            self.avatar.reserveHandle()
        except SFTPError:
            return defer.fail()
        owner, group = self.avatar.account.listing_owner
        now = time.time()

        def listing(reader: FolderReader) -> DirectoryListing:
            # In opendir's thread trip: the first READDIR is answered without another.
            return DirectoryListing(self.filesystem, reader, owner, group, now).prepared()

        d = self.filesystem.open_folder(path, then=listing).addBoth(self.avatar.releaseHandle)
        return d.addErrback(sftp_error)

    def getAttrs(self, path: bytes, followLinks: bool) -> defer.Deferred:
        # STAT follows a symlink; LSTAT gives the link itself, as READDIR lists it.
        if followLinks:
            return self.filesystem.stat(path).addCallback(_attributes).addErrback(sftp_error)
        lstat = self.filesystem.lstat(path)
        return lstat.addCallback(lambda listed: _attributes(listed.result)).addErrback(sftp_error)

    def setAttrs(self, path: bytes, attrs: dict) -> defer.Deferred:
        # Permission bits alone: accepted and ignored with allow-write, but a missing file is still said so.
        size, times = _attributes_to_set(attrs)
        return self.filesystem.set_attributes(path, size, times).addCallback(lambda ignored: None).addErrback(sftp_error)

    def statvfs(self, path: bytes) -> defer.Deferred:
        return self.filesystem.statvfs(path).addErrback(sftp_error)

    def readLink(self, path: bytes) -> defer.Deferred:
        """What a symlink points to, relative to its folder as the session sees it, never a server path."""
        return self.filesystem.read_link(path).addCallback(disk_bytes).addErrback(sftp_error)

    def makeLink(self, linkPath: bytes, targetPath: bytes) -> defer.Deferred:
        refused = defer.fail(SFTPError(FX_PERMISSION_DENIED, "symbolic links cannot be created"))
        return self.filesystem.log_change(refused, "make link", linkPath, reason_of=_sftp_reason)

    def realPath(self, path: bytes) -> bytes:
        try:
            return disk_bytes(virtual_path(path))
        except InvalidPath as error:
            raise SFTPError(FX_BAD_MESSAGE, _ascii(str(error))) from None

    def extendedRequest(self, extendedName: bytes, extendedData: bytes) -> None:
        # SFTPSubsystem.packet_EXTENDED answers the extensions of SFTP_EXTENSIONS itself.
        raise SFTPError(FX_OP_UNSUPPORTED, "extended requests are not supported")


def _close_quietly(closing: defer.Deferred, what: str) -> None:
    """Let a file or folder nobody waits for close (``file.abandon()`` drops its pending operations); a failure is logged, not left unhandled."""
    closing.addErrback(lambda failure: _log.failure(f"closing an abandoned {what}", failure=failure))


class _QuietLogger(Logger):
    """For conch's classes: keep warnings and errors only.

    conch logs every SFTP packet, key exchange algorithms, "trying auth" with
    the raw username, and each channel open and close, at debug and info
    level, for every login. The audit log has the logins and sessions;
    sftpauth's own lines (module loggers) are not affected.
    """

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: Any) -> None:
        if level in (LogLevel.debug, LogLevel.info):
            return
        super().emit(level, format, **kwargs)


# conch's session module logs 'Asking for subsystem "sftp"' with its module
# logger, at info, once per login: quiet it as the classes' loggers are.
session.log = _QuietLogger(namespace=session.log.namespace)


@implementer(IPushProducer)
class SFTPSubsystem(FileTransferServer):
    """conch's SFTP protocol with our server, bounded resources and no fd leak.

    Flow control, as OpenSSH's sftp-server takes a new request only while
    its output queue is short: at most :data:`MAX_PENDING_REQUESTS` requests
    (and :data:`MAX_PENDING_REPLY_BYTES` of replies they may produce) are
    worked on at once, and none while the channel holds more than
    :data:`OUTPUT_HIGH_WATER` unsent bytes (the channel pauses this producer).
    Later requests stay unread and the channel stops opening its window, so
    a client that pipelines reads and never collects the answers makes the
    server wait, not work; it can have no more than a window of requests
    queued. When the session ends, what is queued is dropped.

    Order, as the SFTP draft asks ("as if it had sent the requests one at a
    time"): requests on open handles run side by side, each handle's in
    the order sent (its lock); any other request (a path: MKDIR, RENAME,
    SETSTAT, OPEN...; an extension) starts only when every request before
    it has been answered, and holds back every request after it until it
    is answered. Pipelined ``mkdir -p`` (lftp) or WRITE, CLOSE, SETSTAT,
    RENAME (WinSCP) then do what they would one at a time; OpenSSH's
    sftp-server runs everything one at a time.
    """

    _log = _QuietLogger()

    def __init__(self, data: Optional[bytes] = None, avatar: Optional["SFTPUser"] = None):
        FileTransferBase.__init__(self)
        assert avatar is not None
        self.avatar = avatar
        self.client = JailedSFTPServer(avatar)
        self.openFiles: dict[bytes, JailedFile] = {}
        self.openDirs: dict[bytes, list] = {}
        self.buf = bytearray()  # requests received, not yet dispatched
        self._pending: dict[bytes, list[int]] = {}  # request id -> reply bytes reserved, per request
        self._pendingCount = 0
        self._pendingBytes = 0
        self._repliesPaused = False
        self._readingPaused = False
        self._dispatching = False
        self._held: deque[tuple[int, bytes]] = deque()  # admitted requests waiting for their turn (see the class)
        self._running = 0  # requests started and not answered yet
        self._runningAlone = False  # the one running is a request that runs alone
        self._startingHeld = False

    def connectionMade(self) -> None:
        channel = self._channel()
        if channel is not None:
            channel.registerProducer(self, True)

    def _channel(self) -> Optional["SFTPSessionChannel"]:
        # The transport is conch's SSHSessionProcessProtocol; its session is the channel.
        channel = getattr(self.transport, "session", None)
        return channel if isinstance(channel, SFTPSessionChannel) else None

    def dataReceived(self, data: bytes) -> None:
        if not self.connected:
            return
        self.buf += data
        self._dispatchRequests()

    def _admitting(self) -> bool:
        return (
            not self._repliesPaused
            and self._pendingCount < MAX_PENDING_REQUESTS
            and self._pendingBytes < MAX_PENDING_REPLY_BYTES
        )

    def _dispatchRequests(self) -> None:
        """conch's packet loop, within the limits, and every request gets an answer.

        conch logs a malformed or unknown request and never replies, so the
        client waits forever; here it gets "bad message" or "unsupported".
        An oversized or nonsensical length closes the session, as OpenSSH's
        sftp-server does.
        """
        if self._dispatching:
            return  # a reply sent while dispatching: the loop below goes on
        self._dispatching = True
        offset = 0
        try:
            while self.connected and self._admitting() and len(self.buf) - offset >= 9:
                length, kind = struct.unpack_from("!LB", self.buf, offset)
                if length > MAX_SFTP_PACKET or length < 5:
                    self._protocolError(f"a request of {length} bytes")
                    return
                if len(self.buf) - offset < 4 + length:
                    break
                packet = bytes(self.buf[offset + 5 : offset + 4 + length])
                offset += 4 + length
                self._dispatch(kind, packet)
        finally:
            del self.buf[:offset]
            self._dispatching = False
        self._updateReading()

    def _dispatch(self, kind: int, packet: bytes) -> None:
        if kind != FXP_INIT:  # INIT has no request id; its VERSION answer is not counted
            self._reserve(packet[:4], _reply_bytes(kind, packet))
        if self._held or not self._mayStart(kind):
            self._held.append((kind, packet))
            return
        self._start(kind, packet)

    def _mayStart(self, kind: int) -> bool:
        if kind == FXP_INIT:
            return True
        if kind in HANDLE_REQUESTS:
            return not self._runningAlone
        return self._running == 0

    def _startHeld(self) -> None:
        """Start the held requests whose turn has come, in order (an answer sent while starting one goes on here)."""
        if self._startingHeld:
            return
        self._startingHeld = True
        try:
            while self.connected and self._held and self._mayStart(self._held[0][0]):
                self._start(*self._held.popleft())
        finally:
            self._startingHeld = False

    def _start(self, kind: int, packet: bytes) -> None:
        requestId = packet[:4]
        if kind != FXP_INIT:
            self._running += 1
            self._runningAlone = kind not in HANDLE_REQUESTS
        name = self.packetTypes.get(kind)
        handler = getattr(self, f"packet_{name}", None) if name else None
        if handler is None:
            self._sendStatus(requestId, FX_OP_UNSUPPORTED, b"unsupported request")
            return
        try:
            handler(packet)
        except Exception as error:
            _log.warn(
                "sftp {username}: malformed {kind} request ({error})",
                username=self.avatar.account.username,
                kind=name,
                error=f"{type(error).__name__}: {error}"[:200],
            )
            if kind == FXP_INIT:
                self._protocolError("a malformed INIT")
                return
            self._sendStatus(requestId, FX_BAD_MESSAGE, b"malformed request")

    def packet_EXTENDED(self, data: bytes) -> None:
        """OpenSSH's extensions (:data:`SFTP_EXTENSIONS`); any other name is "unsupported".

        A malformed request raises here: :meth:`_dispatch` answers "bad message".
        """
        requestId = data[:4]
        name, rest = getNS(data[4:])
        if name == b"posix-rename@openssh.com":
            oldPath, rest = getNS(rest)
            newPath, rest = getNS(rest)
            _no_more(rest)
            d = self.client.renameFile(oldPath, newPath, overwrite=True)
            self._answerStatus(d, requestId, b"rename succeeded")
        elif name == b"statvfs@openssh.com":
            path, rest = getNS(rest)
            _no_more(rest)
            self._answerExtended(self.client.statvfs(path).addCallback(statvfs_reply), requestId)
        elif name in (b"fstatvfs@openssh.com", b"fsync@openssh.com"):
            handle, rest = getNS(rest)
            _no_more(rest)
            fileObj = self.openFiles.get(handle)
            if fileObj is None:
                self._sendStatus(requestId, FX_FAILURE, b"invalid handle")
            elif name == b"fsync@openssh.com":
                self._answerStatus(fileObj.sync(), requestId, b"fsync succeeded")
            else:
                self._answerExtended(fileObj.statvfs().addCallback(statvfs_reply), requestId)
        elif name == b"limits@openssh.com":
            _no_more(rest)
            limits = struct.pack("!4Q", MAX_CLIENT_MESSAGE, MAX_READ_LENGTH, MAX_WRITE_LENGTH, MAX_OPEN_HANDLES)
            self.sendPacket(FXP_EXTENDED_REPLY, requestId + limits)
        else:
            self._sendStatus(requestId, FX_OP_UNSUPPORTED, b"unsupported extension")

    def _answerStatus(self, d: defer.Deferred, requestId: bytes, message: bytes) -> None:
        d.addCallback(self._cbStatus, requestId, message)
        d.addErrback(self._ebStatus, requestId)

    def _answerExtended(self, d: defer.Deferred, requestId: bytes) -> None:
        d.addCallback(lambda body: self.sendPacket(FXP_EXTENDED_REPLY, requestId + body))
        d.addErrback(self._ebStatus, requestId)

    def _reserve(self, requestId: bytes, replyBytes: int) -> None:
        self._pending.setdefault(requestId, []).append(replyBytes)
        self._pendingCount += 1
        self._pendingBytes += replyBytes

    def _release(self, requestId: bytes) -> None:
        reserved = self._pending.get(requestId)
        if not reserved:
            return
        replyBytes = reserved.pop(0)
        if not reserved:
            del self._pending[requestId]
        self._pendingCount -= 1
        self._pendingBytes -= replyBytes

    def sendPacket(self, kind: int, data: bytes) -> None:
        """Answer a request, unless the session is over; the answer frees the request's share of the limits."""
        if not self.connected:
            return  # a read that finished after the client left: nobody to send it to
        if kind != FXP_VERSION:
            self._release(data[:4])
            if self._running:
                self._running -= 1
            if not self._running:
                self._runningAlone = False
        FileTransferBase.sendPacket(self, kind, data)
        if self._held:
            self._startHeld()
        if self.buf or self._readingPaused:  # a freed place: requests may be waiting for it
            self._dispatchRequests()

    def _updateReading(self) -> None:
        """Close the channel's window while requests wait here that this session cannot take yet."""
        pause = self.connected and bool(self.buf) and not self._admitting()
        channel = self._channel()
        if channel is None or pause == self._readingPaused:
            return
        self._readingPaused = pause
        if pause:
            channel.pauseProducing()
        else:
            channel.resumeProducing()

    # IPushProducer: the channel pauses the replies while the client does not read them.

    def pauseProducing(self) -> None:
        self._repliesPaused = True
        self._updateReading()

    def resumeProducing(self) -> None:
        self._repliesPaused = False
        self._dispatchRequests()

    def stopProducing(self) -> None:
        self.buf.clear()
        self._held.clear()

    def _protocolError(self, what: str) -> None:
        _log.warn(
            "sftp {username}: closing the session, the client sent {what}",
            username=self.avatar.account.username,
            what=what,
        )
        self.buf.clear()
        channel = self._channel()
        if channel is not None:
            channel.exitStatus = 1
            connection = channel.conn.transport  # the session-end says why, whatever the client does next
            connection.end_reason = connection.end_reason or "protocol-error"
        self.transport.loseConnection()

    def handleCount(self) -> int:
        """Files and folders this session has open."""
        return len(self.openFiles) + len(self.openDirs)

    def _admit(self, close: Callable[[], defer.Deferred], what: str) -> bool:
        """Whether a file or folder just opened gets a handle; if not, ``close()`` it quietly.

        Not when the session ended while it was being opened (False), nor
        beyond MAX_OPEN_HANDLES for the connection (SFTPError to the client).
        """
        if not self.connected:
            _close_quietly(close(), what)
            return False
        if self.avatar.openHandles() >= MAX_OPEN_HANDLES:
            _close_quietly(close(), what)
            raise SFTPError(FX_FAILURE, f"too many open files (at most {MAX_OPEN_HANDLES})")
        return True

    def _cbOpenFile(self, fileObj: JailedFile, requestId: bytes) -> None:
        if self._admit(fileObj.abandon, "file"):
            super()._cbOpenFile(fileObj, requestId)

    def _cbOpenDirectory(self, dirObj: DirectoryListing, requestId: bytes) -> None:
        if not self._admit(dirObj.close, "folder"):
            return
        handle = str(hash(dirObj)).encode("ascii")
        self.openDirs[handle] = [dirObj, None]
        self.sendPacket(FXP_HANDLE, requestId + NS(handle))

    def packet_READDIR(self, data: bytes) -> None:
        """The next batch of the listing, made in a thread (see :class:`DirectoryListing`)."""
        requestId = data[:4]
        handle, rest = getNS(data[4:])
        if rest:
            raise ValueError("extra data after the handle")
        if handle not in self.openDirs:
            self._sendStatus(requestId, FX_FAILURE, b"invalid handle")
            return
        d = self.openDirs[handle][0].nextBatch()
        d.addCallback(lambda body: self.sendPacket(FXP_NAME, requestId + body))
        d.addErrback(self._ebStatus, requestId, b"scan directory failed")

    def packet_CLOSE(self, data: bytes) -> None:
        handle, rest = getNS(data[4:])
        if handle not in self.openFiles and handle not in self.openDirs:
            # conch answers "No such file or directory", which READ, WRITE and READDIR do not.
            self._sendStatus(data[:4], FX_FAILURE, b"invalid handle")
            return
        super().packet_CLOSE(data)

    def _cbClose(self, result: Any, handle: bytes, requestId: bytes, isDir: int = 0) -> None:
        # The session may have ended (and closed everything) while this close ran.
        (self.openDirs if isDir else self.openFiles).pop(handle, None)
        if self.connected:
            self._sendStatus(requestId, FX_OK, b"file closed")

    def _ebStatus(self, reason: Failure, requestId: bytes, msg: bytes = b"request failed") -> None:
        if reason.check(KeyError):  # conch's lookups of a handle the client never got
            self._sendStatus(requestId, FX_FAILURE, b"invalid handle")
            return
        if reason.check(EOFError):  # the end of a file or listing is no failure (conch: "read failed")
            self._sendStatus(requestId, FX_EOF, b"End of file")
            return
        super()._ebStatus(reason, requestId, msg)

    def _ebRead(self, reason: Failure, requestId: bytes) -> None:
        # conch's packet_READ and packet_WRITE call these for an unknown handle but do not define them.
        self._ebStatus(reason, requestId)

    _ebWrite = _ebRead

    def closeHandles(self) -> None:
        """Close every file and folder still open (the session is over)."""
        files, self.openFiles = list(self.openFiles.values()), {}
        for fileObj in files:
            _close_quietly(fileObj.abandon(), "file")
        directories, self.openDirs = list(self.openDirs.values()), {}
        for dirObj, _ in directories:
            _close_quietly(dirObj.close(), "folder")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        FileTransferBase.connectionLost(self, reason)
        self.buf.clear()  # requests not dispatched yet are never run
        self._held.clear()
        channel = self._channel()
        if channel is not None:
            channel.unregisterProducer()
        self.closeHandles()
        self.avatar.subsystemEnded(self)


def _no_more(rest: bytes) -> None:
    if rest:
        raise ValueError("extra data at the end of the request")


def _reply_bytes(kind: int, packet: bytes) -> int:
    """How many bytes the answer to a request may have: a READ's length, a READDIR batch, else small."""
    if kind == FXP_READ:
        try:
            (handleLength,) = struct.unpack_from("!L", packet, 4)
            (length,) = struct.unpack_from("!L", packet, 8 + handleLength + 8)
        except struct.error:
            return 0  # malformed: answered with "bad message"
        return min(length, MAX_READ_LENGTH)
    if kind == FXP_READDIR:
        return READDIR_BATCH_BYTES
    return 0


# -- SSH session and avatar ----------------------------------------------------------


@implementer(IConsumer, IPushProducer)
class SFTPSessionChannel(session.SSHSession):
    """A ``session`` channel that only ever runs the ``sftp`` subsystem.

    Its output is buffered in a bytearray (conch's ``buf += data`` on bytes
    copies the whole backlog for every reply: quadratic), dropped once the
    channel is closed, and it pauses its producer (the SFTP session) while
    more than :data:`OUTPUT_HIGH_WATER` bytes wait for the client's window.
    As a producer of the client's data, it can pause reading: the local
    window is then not opened again, so the client has to wait.

    When the subsystem ends, the channel sends ``exit-status`` (0, or 1
    after a protocol error) and EOF before its close, as sshd does when
    sftp-server exits: OpenSSH's ``scp`` and ``ssh -s`` exit with it.
    """

    _log = _QuietLogger()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.exitStatus = 0
        self._unsent = bytearray()
        self._producer: Optional[IPushProducer] = None
        self._producerPaused = False
        self.readingPaused = False

    # -- output --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.localClosed or self.remoteClosed:
            return  # the client will never read it
        if self._unsent:
            self._unsent += data
        else:  # the usual case: straight from the answer, only the rest is copied
            self._unsent += memoryview(data)[self._sendWithinWindow(data) :]
        self._flush()
        if len(self._unsent) > OUTPUT_HIGH_WATER and self._producer is not None and not self._producerPaused:
            self._producerPaused = True
            self._producer.pauseProducing()

    def _sendWithinWindow(self, data: Any) -> int:
        """Send the start of ``data`` that the client's window allows, in packets of its maximum size."""
        size = min(len(data), self.remoteWindowLeft)
        if size <= 0:
            return 0
        step = max(self.remoteMaxPacket, 1)
        with memoryview(data) as view:
            for offset in range(0, size, step):
                self.conn.sendData(self, bytes(view[offset : min(offset + step, size)]))
        self.remoteWindowLeft -= size
        return size

    def _flush(self) -> None:
        """Send what the window allows of the backlog; stop or close as conch's channel does."""
        sent = self._sendWithinWindow(self._unsent)
        if sent:
            del self._unsent[:sent]  # bytearray: dropping the front is cheap
        if self._unsent and self.areWriting:
            self.areWriting = 0
            self.stopWriting()
        if self.closing and not self._unsent and not self.extBuf:
            self._sendClose()

    def addWindowBytes(self, data: int) -> None:
        self.remoteWindowLeft += data
        if not self.areWriting and not self.closing:
            self.areWriting = True
            self.startWriting()
        self._flush()
        if self.extBuf:
            pending, self.extBuf = self.extBuf, []
            for dataType, extended in pending:
                self.writeExtended(dataType, extended)
        if self._producerPaused and len(self._unsent) <= OUTPUT_LOW_WATER and self._producer is not None:
            self._producerPaused = False
            self._producer.resumeProducing()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._producer = producer
        self._producerPaused = False

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producerPaused = False

    def loseConnection(self) -> None:
        if self.client and self.client.transport:
            self.client.transport.loseConnection()
        self.closing = 1
        if not self._unsent and not self.extBuf:
            self._sendClose()

    def _sendClose(self) -> None:
        """Close, after what was sent; a subsystem that ran says how it ended first (unless the client has closed)."""
        if self.client is not None and not self.localClosed and not self.remoteClosed:
            self.conn.sendRequest(self, b"exit-status", struct.pack("!L", self.exitStatus))
            self.conn.sendEOF(self)
        self.conn.sendClose(self)

    def eofReceived(self) -> None:
        # The client sent its last request (conch would close at once, dropping answers not sent yet).
        self.loseConnection()

    def closeReceived(self) -> None:
        # The client closed the channel: what it has not read, it never will, nor an exit status
        # (conch marks the channel remotely closed only after this returns).
        del self._unsent[:]
        self.remoteClosed = True
        self.loseConnection()

    def closed(self) -> None:
        del self._unsent[:]
        super().closed()

    # -- input ---------------------------------------------------------------------

    def pauseProducing(self) -> None:
        """Take no more data: the local window stays as the client used it (see SFTPConnection.adjustWindow)."""
        self.readingPaused = True

    def resumeProducing(self) -> None:
        self.readingPaused = False
        if not self.localClosed and self.localWindowLeft < self.localWindowSize // 2:
            self.conn.adjustWindow(self, self.localWindowSize - self.localWindowLeft)

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- requests ------------------------------------------------------------------

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        if requestType == b"subsystem":
            return self.request_subsystem(data)
        if requestType not in ROUTINE_REQUESTS:  # OpenSSH's env LANG...: every login, not worth a line
            _log.info(
                "refused a {request!r} request on an SFTP-only session",
                request=_client_name(requestType),
            )
        return 0

    def request_subsystem(self, data: bytes) -> int:
        try:
            name = getNS(data)[0]
        except Exception:
            return 0
        if name != b"sftp" or not self.avatar.sftpEnabled:
            _log.info(
                "refused the {name!r} subsystem", name=_client_name(name)
            )
            return 0
        if self.client is not None:
            # One subsystem per session channel (RFC 4254 6.5): the client's mistake, not an error of ours,
            # which conch would log at error level.
            _log.info("refused a second subsystem request on one session channel")
            return 0
        return super().request_subsystem(data)


@implementer(IConchUser)
class SFTPUser(ConchUser):
    """The avatar of an SSH login: session channels with SFTP, nothing else."""

    def __init__(self, account: Account, filesystem: JailedFilesystem, sftpEnabled: bool = True):
        super().__init__()
        self.account = account
        self.filesystem = filesystem
        self.sftpEnabled = sftpEnabled
        self.channelLookup[b"session"] = SFTPSessionChannel
        self._subsystems: list[SFTPSubsystem] = []
        self._opening = 0  # files and folders being opened

    def openHandles(self) -> int:
        """Files and folders open (or being opened) in all SFTP sessions of this connection."""
        return self._opening + sum(sftp.handleCount() for sftp in self._subsystems)

    def reserveHandle(self) -> None:
        """Count a file or folder about to be opened; refused past :data:`MAX_OPEN_HANDLES` per connection.

        Per connection, not per session: a client may open several sessions
        (channels), and each handle is a file descriptor of the server.
        """
        if self.openHandles() >= MAX_OPEN_HANDLES:
            raise SFTPError(FX_FAILURE, f"too many open files (at most {MAX_OPEN_HANDLES})")
        self._opening += 1

    def releaseHandle(self, result: Any) -> Any:
        """The open reserved by :meth:`reserveHandle` is over (a handle now, or failed); passes ``result`` on."""
        self._opening -= 1
        return result

    def lookupSubsystem(self, subsystem: bytes, data: bytes) -> Optional[SFTPSubsystem]:
        if subsystem != b"sftp" or not self.sftpEnabled:
            return None
        sftp = SFTPSubsystem(data, avatar=self)
        self._subsystems.append(sftp)
        return sftp

    def subsystemEnded(self, sftp: SFTPSubsystem) -> None:
        if sftp in self._subsystems:
            self._subsystems.remove(sftp)

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        if requestType not in ROUTINE_REQUESTS:
            _log.info(
                "refused the global request {request!r} (port forwarding is not available)",
                request=_client_name(requestType),
            )
        return 0

    def logout(self) -> None:
        """Release what the connection left open (normally already closed)."""
        for sftp in list(self._subsystems):
            sftp.closeHandles()
        self._subsystems = []


# -- SSH protocol --------------------------------------------------------------------


class LoginState:
    """Authentication state of one connection, kept on the transport.

    conch makes a new ``ssh-userauth`` service object each time the client
    asks for the service (paramiko asks before every attempt), so a count
    kept on that object would start again at zero.
    """

    def __init__(self) -> None:
        self.failures = 0
        self.busy = False
        self.queued: list[bytes] = []
        self.conversation: Optional[KeyboardInteractive] = None


class KeyboardInteractive:
    """One keyboard-interactive attempt (RFC 4256): the prompts, then one login.

    The first prompt (``keyboard_interactive_message``) takes the password.
    When the chain says the username's method wants a code appended (TOTP),
    a second prompt asks for it; only then is anything checked, with
    password and code as the one string password logins use. So the client
    learns nothing about the password before it typed the code: it gets the
    second prompt whether the password is right or not.
    """

    def __init__(self, server: "UserAuthServer", username: bytes):
        self.server = server
        self.username = username
        self.result: defer.Deferred = defer.Deferred()
        self.waiting = True  # for the client's INFO_RESPONSE
        self.password: Optional[bytes] = None
        self.factor: Optional[SecondFactor] = None

    def abandon(self) -> None:
        """The client started another request: this attempt ends without a reply of its own."""
        if self.waiting:
            self.waiting = False
            self.result.errback(conch_error.IgnoreAuthentication())


class UserAuthServer(userauth.SSHUserAuthServer):
    """``ssh-userauth`` with password and keyboard-interactive logins through our portal.

    Requests are checked one at a time per connection: a client that
    pipelines attempts (or restarts the service between them) can neither
    run them in parallel nor get past :data:`MAX_PASSWORD_ATTEMPTS`.
    The methods offered are those of the credentials the portal's checkers
    accept (:data:`METHODS_BY_CREDENTIALS`).
    """

    _log = _QuietLogger()

    loginTimeout = LOGIN_GRACE_SECONDS
    attemptsBeforeDisconnect = 2**31  # conch's per-service count is replaced by LoginState (per connection)

    def serviceStarted(self) -> None:
        self.clock = self.transport.factory.reactor
        self._stopped = False
        super().serviceStarted()
        methods: list[bytes] = []
        for interface in self.portal.listCredentialsInterfaces():
            methods += [method for method in METHODS_BY_CREDENTIALS.get(interface, ()) if method not in methods]
        # Key exchange is always over when this service runs, so the
        # password never travels in clear; keep conch's check anyway.
        self.supportedAuthentications = methods if self.transport.isEncrypted("in") else []

    def serviceStopped(self) -> None:
        self._stopped = True
        conversation = self._loginState.conversation
        if conversation is not None and conversation.server is self:
            conversation.abandon()
        super().serviceStopped()

    @property
    def _loginState(self) -> LoginState:
        return self.transport.loginState

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> None:
        if self._stopped or self.transport.service is not self:
            return
        attempts = self._loginState
        if attempts.conversation is not None and attempts.conversation.waiting:
            attempts.conversation.abandon()  # RFC 4256 3.3: a new request ends the exchange
        if attempts.busy:
            if len(attempts.queued) >= MAX_QUEUED_AUTH_REQUESTS:
                self.transport.sendDisconnect(
                    transport.DISCONNECT_PROTOCOL_ERROR, b"too many authentication requests at once"
                )
                return
            attempts.queued.append(packet)
            return
        attempts.busy = True
        try:
            d = super().ssh_USERAUTH_REQUEST(packet)
        except Exception:
            attempts.busy = False
            raise
        if d is None:
            self._requestDone(None)
        else:
            d.addBoth(self._requestDone)

    def _requestDone(self, result: Any) -> None:
        attempts = self._loginState
        attempts.busy = False
        attempts.conversation = None
        if isinstance(result, Failure):
            _log.failure("SSH authentication request failed", failure=result)
        current = self.transport.service
        if attempts.queued and isinstance(current, UserAuthServer) and not current._stopped:
            current.ssh_USERAUTH_REQUEST(attempts.queued.pop(0))
        elif not isinstance(current, UserAuthServer):
            attempts.queued = []

    def _ebBadAuth(self, reason: Failure) -> None:
        if self.method != b"none" and not reason.check(conch_error.IgnoreAuthentication):
            attempts = self._loginState
            attempts.failures += 1
            if attempts.failures >= MAX_PASSWORD_ATTEMPTS:
                _log.info(
                    "service {service}: disconnecting {peer} after {count} failed logins",
                    service=self.transport.factory.settings.id,
                    peer=plain_address(getattr(self.transport.transport.getPeer(), "host", "")),
                    count=attempts.failures,
                )
                attempts.queued = []
                self.transport.sendDisconnect(
                    transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"too many failed logins"
                )
                return
        super()._ebBadAuth(reason)

    def _peer(self) -> str:
        return plain_address(getattr(self.transport.transport.getPeer(), "host", "") or "")

    def _login(self, username: bytes, password: bytes, malformed: str = "") -> defer.Deferred:
        """One login through the portal; a failure is answered FAILED_LOGIN_DELAY after the request, as on FTP."""
        settings: SSHServiceSettings = self.transport.factory.settings
        peer = self._peer()
        # Bytes that are not UTF-8 become lone surrogates: the chain rejects
        # them as an invalid username or password, and audits the attempt.
        request = LoginRequest(
            username=username.decode("utf-8", "surrogateescape"),
            password=password.decode("utf-8", "surrogateescape"),
            service_id=settings.id,
            protocol="sftp",
            peer=peer,
            malformed=malformed,
        )
        started = self.clock.seconds()
        d = self.portal.login(request, SessionInfo(settings.id, "sftp", peer), IConchUser)
        return d.addErrback(lambda failure: answer_failure(self.clock, started, failure))

    def auth_password(self, packet: bytes) -> defer.Deferred:
        """Password authentication through the chain; always a failed login, never a crash."""
        try:
            password = getNS(packet[1:])[0]
        except Exception:
            return defer.fail(conch_error.ConchError("malformed password request"))
        return self._login(self.user, password)

    # -- keyboard-interactive (RFC 4256) ---------------------------------------------

    def auth_keyboard_interactive(self, packet: bytes) -> defer.Deferred:
        """Start the prompts; the Deferred fires when the client answered them and the chain decided."""
        try:
            getNS(packet, 2)  # language tag and submethods: nothing to choose from
        except Exception:
            return defer.fail(conch_error.ConchError("malformed keyboard-interactive request"))
        conversation = KeyboardInteractive(self, self.user)
        self._loginState.conversation = conversation
        message = self.transport.factory.settings.keyboard_interactive_message
        self._prompt(message)
        return conversation.result

    def _prompt(self, text: str) -> None:
        # Sent as configured (SPEC: the prompt is keyboard_interactive_message); clients
        # show it before the input, and a trailing space can be given in quotes.
        payload = NS(b"") + NS(b"") + NS(b"") + struct.pack(">L", 1) + NS(text.encode("utf-8")) + b"\x00"
        self.transport.sendPacket(userauth.MSG_USERAUTH_INFO_REQUEST, payload)

    def ssh_USERAUTH_INFO_RESPONSE(self, packet: bytes) -> None:
        conversation = self._loginState.conversation
        if conversation is None or not conversation.waiting:
            self.transport.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"unexpected keyboard-interactive response")
            return
        (count,) = struct.unpack(">L", packet[:4])
        if count > 16:
            raise conch_error.ConchError(f"{count} keyboard-interactive responses")
        responses = getNS(packet[4:], count)[:count] if count else []
        if count != 1:
            # One prompt, one answer: anything else fails, through the chain so that it is
            # audited and counted against the address like any other failed login.
            conversation.waiting = False
            malformed = f"{count} keyboard-interactive answers to one prompt"
            self._login(conversation.username, b"", malformed).chainDeferred(conversation.result)
            return
        answer = responses[0]
        if conversation.password is None:
            conversation.password = answer
            conversation.factor = self._second_factor(conversation.username)
            if conversation.factor is not None:
                self._prompt(conversation.factor.prompt)
                return
            secret = answer
        else:
            code = answer.decode("utf-8", "surrogateescape")
            secret = conversation.factor.combine(conversation.password.decode("utf-8", "surrogateescape"), code).encode(
                "utf-8", "surrogateescape"
            )
        conversation.waiting = False
        self._login(conversation.username, secret).chainDeferred(conversation.result)

    def _second_factor(self, username: bytes) -> Optional[SecondFactor]:
        """Ask the portal's checker (the chain) whether this username's login needs a code."""
        checker = self.portal.checkers.get(ILoginRequest)
        ask = getattr(checker, "second_factor", None)
        if ask is None:
            return None
        settings: SSHServiceSettings = self.transport.factory.settings
        request = LoginRequest(
            username=username.decode("utf-8", "surrogateescape"),
            password="",
            service_id=settings.id,
            protocol="sftp",
            peer=self._peer(),
        )
        return ask(request)

    def _cbFinishedAuth(self, result: tuple) -> None:
        interface, avatar, logout = result
        ssh_transport = self.transport

        def endSession() -> None:
            try:
                avatar.logout()
            finally:
                logout(ssh_transport.end_reason)

        if self._stopped:
            endSession()  # the client left while the chain was working: end the session now
            return
        avatar.sftpEnabled = ssh_transport.factory.settings.sftp

        super()._cbFinishedAuth((interface, avatar, endSession))


PasswordUserAuthServer = UserAuthServer  # the name before keyboard-interactive
# The SSH methods each kind of credentials the portal may accept stands for.
METHODS_BY_CREDENTIALS = {ILoginRequest: (b"password", b"keyboard-interactive")}


class SFTPConnection(connection.SSHConnection):
    """``ssh-connection`` that refuses every channel type but ``session`` up front."""

    _log = _QuietLogger()

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channel_type, rest = getNS(packet)
        sender = struct.unpack(">L", rest[:4])[0]
        if channel_type not in self.transport.avatar.channelLookup:
            _log.info(
                "refused a {kind!r} channel (only SFTP sessions are available)",
                kind=_client_name(channel_type),
            )
            self._refuse(sender, connection.OPEN_ADMINISTRATIVELY_PROHIBITED, b"only SFTP sessions are available")
            return
        if len(self.channels) >= MAX_SESSION_CHANNELS:
            self._refuse(sender, connection.OPEN_RESOURCE_SHORTAGE, b"too many sessions on one connection")
            return
        if len(rest) >= 12 and struct.unpack(">L", rest[8:12])[0] < MIN_CLIENT_MAX_PACKET:
            _log.info("refused a session channel whose maximum packet size is under {minimum} bytes", minimum=MIN_CLIENT_MAX_PACKET)
            self._refuse(sender, connection.OPEN_ADMINISTRATIVELY_PROHIBITED, b"maximum packet size too small")
            return
        super().ssh_CHANNEL_OPEN(packet)

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        # A channel whose SFTP session takes no more requests for now keeps its
        # window closed: the client waits instead of queueing requests.
        if getattr(channel, "readingPaused", False):
            return
        super().adjustWindow(channel, bytesToAdd)

    def _refuse(self, sender: int, reason: int, text: bytes) -> None:
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE, struct.pack(">2L", sender, reason) + NS(text) + NS(b"")
        )


class SFTPServerTransport(transport.SSHServerTransport, TimeoutMixin):
    """The SSH transport with a login deadline and ``idle_connection_timeout``."""

    _log = _QuietLogger()

    ourVersionString = VERSION_STRING
    _graceCall = None
    end_reason = ""  # why the connection is ending: the session-end's reason (sftpauth.realm.SESSION_END_REASONS)
    # No compression: conch's "zlib" starts before authentication and inflates without a
    # size limit on the reactor thread, so 1 MB from anyone became 1 GB (a zlib bomb).
    supportedCompressions = [b"none"]
    supportedCiphers = CIPHERS
    supportedMACs = MACS

    def callLater(self, period: float, function: Callable[[], Any]) -> Any:  # TimeoutMixin's clock
        return self.factory.reactor.callLater(period, function)

    def connectionMade(self) -> None:
        self.loginState = LoginState()
        self._graceCall = self.factory.reactor.callLater(LOGIN_GRACE_SECONDS, self._loginTooSlow)
        self.setTimeout(self.factory.settings.idle_connection_timeout or None)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        try:
            super().dataReceived(data)
        except Exception as error:
            # conch raises on many malformed packets; that ends this connection
            # with a clear message instead of an "Unhandled Error" traceback.
            if isinstance(error, MALFORMED_INPUT_ERRORS):
                _log.warn(
                    "service {service}: disconnecting {peer}, malformed SSH packet ({error})",
                    service=self.factory.settings.id,
                    peer=plain_address(getattr(self.transport.getPeer(), "host", "")),
                    error=f"{type(error).__name__}: {error}"[:200],
                )
            else:
                _log.failure("service {service}: SSH packet handling failed", service=self.factory.settings.id)
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, b"malformed packet")

    def _loginTooSlow(self) -> None:
        self._graceCall = None
        if not hasattr(self, "avatar"):
            self.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"login took too long")

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # A client saying goodbye (or giving up) is not a server error. The
        # ordinary goodbye is in the audit log (session-end): not logged.
        self.end_reason = self.end_reason or "logout"
        if reasonCode == transport.DISCONNECT_BY_APPLICATION:
            return
        _log.info(
            "client disconnected: code {code}, {description}",
            code=reasonCode,
            description=printable(description.decode("utf-8", "surrogateescape")[:200]),
        )

    def timeoutConnection(self) -> None:
        _log.info(
            "service {service}: closing a connection idle for {seconds} seconds",
            service=self.factory.settings.id,
            seconds=self.factory.settings.idle_connection_timeout,
        )
        self.end_reason = self.end_reason or "idle-timeout"
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"idle connection timeout")

    def shutting_down(self) -> None:
        """sftpauth is stopping (sftpauth.listening.ListeningService): the client is told why, then the connection closes."""
        self.end_reason = self.end_reason or "shutdown"
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, b"the server is shutting down")

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        # Ours or conch's: unless a caller said why, the server ends the connection over what the client sent.
        self.end_reason = self.end_reason or "protocol-error"
        super().sendDisconnect(reason, desc)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        if not self.end_reason:
            self.end_reason = "connection-closed" if reason is None or reason.check(ConnectionDone) else "connection-lost"
        self.setTimeout(None)
        if self._graceCall is not None and self._graceCall.active():
            self._graceCall.cancel()
        self._graceCall = None
        super().connectionLost(reason)


class SFTPFactory(factory.SSHFactory):
    protocol = SFTPServerTransport
    noisy = False  # the port's "starting on" line says it; no "Starting factory <... at 0x...>" beside it
    services = {
        b"ssh-userauth": UserAuthServer,
        b"ssh-connection": SFTPConnection,
    }

    def __init__(self, settings: SSHServiceSettings, runtime: Runtime, host_keys: dict[bytes, keys.Key]):
        self.settings = settings
        self.reactor = runtime.reactor
        self.portal = runtime.portal
        self.privateKeys = dict(host_keys)
        self.publicKeys = {key_type: key.public() for key_type, key in host_keys.items()}
        self.primes = None  # no moduli file: only fixed-group and elliptic-curve key exchanges

    def buildProtocol(self, addr: Any) -> SFTPServerTransport:
        built = protocol.Factory.buildProtocol(self, addr)
        built.supportedPublicKeys = [
            algorithm
            for key in self.privateKeys.values()
            for algorithm in key.supportedSignatureAlgorithms()
            if algorithm not in WEAK_HOST_KEY_SIGNATURES
        ]
        # conch's own order (post-quantum hybrid first), without SHA-1 and
        # without group exchange (no moduli file: self.primes is None).
        built.supportedKeyExchanges = [kex for kex in built.supportedKeyExchanges if kex in KEY_EXCHANGES]
        return built

    def getService(self, serverTransport: SFTPServerTransport, service: bytes):
        if service == b"ssh-userauth" or hasattr(serverTransport, "avatar"):
            return self.services.get(service)
        return None


def make_service(settings: SSHServiceSettings, runtime: Runtime) -> IService:
    """The listening SSH/SFTP service of one ``[services/ID]``."""
    host_keys = runtime.host_keys.get(settings.id) or load_host_keys(settings, runtime.configuration.path, runtime.data_folder)
    # Ed25519 first: the key most clients prefer and pin.
    ordered = dict(sorted(host_keys.items(), key=lambda item: item[0] != b"ssh-ed25519"))
    for key_type, key in ordered.items():
        _log.info(
            "service {service}: SSH host key {type} {fingerprint}",
            service=settings.id,
            type=key_type.decode("ascii"),
            fingerprint=fingerprint(key),
        )
    return listening_service(
        runtime.reactor, settings, SFTPFactory(settings, runtime, ordered), runtime.policy_for(settings)
    )
