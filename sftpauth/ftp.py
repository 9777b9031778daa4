"""The FTP service: Twisted's FTP protocol, logged in through the one chain.

Logins build a :class:`LoginRequest` (with the client's address) for the
shared portal instead of Twisted's ``UsernamePassword``; there is no
anonymous login. After login, :class:`JailedFTPShell` turns every command
into a call on the session's :class:`JailedFilesystem`, so the jail,
the group's permissions and the thread pool apply to FTP exactly as to SFTP.

What sftpauth changes in Twisted's FTP protocol, and why:

* the control channel speaks UTF-8; bytes that are not UTF-8 never crash
  a command: they reach the chain as lone surrogates (the login fails as
  invalid-username), a path holding them names the file with those bytes
  (listings send names as they are on disk) and a new name holding them
  gets 553;
* every error answer is an FTP reply without a traceback; a failed login is
  always ``530 Login failed.`` (the reason is in the audit log), sent
  :data:`sftpauth.auth.policy.FAILED_LOGIN_DELAY` after ``PASS``, as SSH does
  (:func:`sftpauth.auth.policy.answer_failure`);
* ``..`` stops at ``/`` (as on SFTP), so ``CWD ../..`` stays at ``/``;
* file data is read and written in the thread pool, never on the reactor;
* a passive data connection is only accepted from the control connection's
  address and ``PORT``/``EPRT`` only to it (no FXP bounce or data theft);
* transfers are always binary, also after ``TYPE A`` (as vsftpd does);
* commands are read while one runs (a transfer, a login) and answered in
  order after it, except ``ABOR`` (cuts the data connection: 426 for the
  transfer, then 226) and ``QUIT`` (221 and the end of the session), which
  act at once; Twisted stopped reading during a transfer, so ``ABOR`` of a
  stalled download waited for the idle timeout;
* TCP urgent data stays in the command stream (``SO_OOBINLINE`` on the
  control socket): ``ftplib.FTP.abort()`` sends ABOR's LF as urgent data,
  which the kernel otherwise removes, so the line never ended; Telnet
  commands before a command (``IAC IP IAC DM``) are skipped;
* a connection that does not log in within :data:`LOGIN_GRACE_SECONDS` is
  closed, whatever commands it sends (Twisted only has the idle timeout);
* after ``PASV``/``EPSV`` the next commands are answered at once; only the
  transfer command waits for the client's data connection (425 after the
  data timeout). Twisted's PASV waited for it, stalling e.g. ``TYPE I`` and
  then answering an unsolicited 425 that put every later reply one late;
* ``MLSD`` and ``MLST`` (RFC 3659) give machine-readable listings: type,
  size, exact UTC modification time, and ``perm`` from the primary group's
  permissions (so a client knows what it may do before it tries); ``MLSD``
  of a file is 501, as pyftpdlib answers (RFC 3659 7.2.1);
* ``RNFR`` of a name that does not exist (or leads outside) is 550 at
  once, not 350 and an error after ``RNTO``;
* ``XPWD``, ``XCWD``, ``XCUP``, ``XMKD``, ``XRMD`` (RFC 775, sent by
  Windows ``ftp.exe``) are ``PWD``, ``CWD``, ``CDUP``, ``MKD``, ``RMD``;
* ``STAT`` (the session's state, or a listing on the control connection)
  and ``HELP`` (RFC 959), which Twisted does not have;
* ``REST n`` (RFC 3659, ``REST STREAM``) resumes the next ``RETR`` at byte
  n, or the next ``STOR`` (the file keeps its first n bytes and is written
  from there); any other command in between cancels it, and an offset past
  the end of the file is 554;
* ``LIST`` shows the account and its primary group as every file's owner
  and group, as SFTP listings do (the files belong to the server's own
  system user; no name lookup per listing);
* listings are formatted in the thread pool (Twisted formats each line on
  the reactor: 200,000 entries stopped every session for seconds), and
  control characters in names are sent as ``?`` (no forged lines);
* the session's logout runs when the connection ends (Twisted looks for
  ``shell.logout`` and so never calls the portal's logout).

FTPS (RFC 4217), with ``ssl_certificate``:

* ``type = ftp``: ``AUTH TLS`` (``TLS-C`` and ``SSL`` too) answers 234 and
  then upgrades the control connection; plain text the client sent behind
  ``AUTH`` before its reply (command injection) is answered 421 and the
  connection closed. ``type = ftpsi``:
  TLS from the first byte, and data connections are protected from the
  start (``PROT P``).
* ``PBSZ 0`` then ``PROT P`` puts TLS on every later data connection,
  passive and active; the FTP server is the TLS server on both, as RFC
  4217 says. ``PROT C`` is refused (534) with
  ``ftps_force_secured_data_channel``, which also refuses ``PASV``/``PORT``
  (521) before ``PROT P``. ``CCC`` is not supported (502): the control
  connection stays encrypted.
* ``ftps_force_secured_command_channel``: ``USER`` before ``AUTH TLS`` is
  530.
* Data-connection theft: a data connection is accepted only from the
  control connection's address (always), and, with
  ``ftps_require_session_reuse``, its TLS handshake must *resume* a TLS
  session of its own control connection. Every control connection has its
  own OpenSSL context (session cache and ticket keys), so no other
  connection's session, not even one of the same user, can be resumed
  there. A data connection that fails the check is aborted before any file
  byte is written to it and the transfer is answered 522.
* Nothing is written to a protected data connection before its handshake
  completed and passed that check: the transfer commands answer 150 (the
  client starts the handshake after it), wait for it, then send.
* A protected upload is complete only when the client ended it with TLS
  close_notify; a cut-off connection is 426 (no truncation attack).
* TLS 1.2 at most (:data:`FTPS_MAXIMUM_VERSION`).
"""

from __future__ import annotations

import calendar
import collections
import errno
import fnmatch
import functools
import inspect
import ipaddress
import os
import re
import socket
import stat as stat_module
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from OpenSSL import SSL
from twisted.application.service import IService, MultiService
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet import interfaces, tcp
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.ssl import TLSVersion
from twisted.logger import Logger
from twisted.protocols import ftp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import filepath
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from zope.interface import implementer

from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.policy import answer_failure, plain_address
from sftpauth.config.errors import ConfigError, ConfigProblem
from sftpauth.config.models import FTPServiceSettings
from sftpauth.filesystem import (
    CONTROL_CHARACTERS, MONTHS, NOT_A_BYTE, FolderReader, InvalidPath, JailedFilesystem, Listed, OffsetPastEnd, OutsideJail,
    PreparedUpload, disk_bytes, printable, refuse_home_folder, resolve_entry,
)
from sftpauth.listening import LOGIN_GRACE_SECONDS, listening_service
from sftpauth.permissions import Permission, PermissionDenied
from sftpauth.realm import SessionInfo
from sftpauth.runtime import Runtime
from sftpauth.signals import ReloadOnSIGHUP
from sftpauth.tls import (
    CertificateProblem,
    DailyDateCheck,
    ServerTLS,
    can_check_session_reuse,
    handshake_finished,
    openssl_reason,
    session_reused,
)

_log = Logger()

AUTH_MECHANISMS = ("TLS", "TLS-C", "SSL")  # SSL: what older clients (curl first) ask for
# TLS 1.2 at most on FTPS: a TLS 1.3 server sends session tickets *after* each
# handshake, also on data connections, and clients that never read an upload's
# data connection (lftp with GnuTLS) then close it with unread data: the kernel
# resets the connection and drops the end of the upload (426). TLS 1.2 resumes
# sessions inside the handshake. TLS 1.2 with Twisted's ECDHE + AEAD suites.
FTPS_MAXIMUM_VERSION = TLSVersion.TLSv1_2
DATA_HANDSHAKE_TIMEOUT = 30  # seconds for the TLS handshake of a protected data connection
CLOSE_GRACE_SECONDS = 10  # a closed control connection is cut off if the client does not close it by then
MAX_QUEUED_COMMANDS = 32  # commands read while one runs; past that, reading pauses


# -- replies ---------------------------------------------------------------------------


class Reply(str):
    """A complete reply line a command returns (Twisted's table stays untouched)."""


class FTPReplyError(ftp.FTPCmdError):
    """An error reply with sftpauth's own wording."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text

    def response(self) -> str:
        return f"{self.code} {self.text}"


def login_failed() -> FTPReplyError:
    return FTPReplyError(530, "Login failed.")


class DataChannelRefused(FTPReplyError):
    """A protected data connection failed its TLS handshake or the session-reuse check."""


def ftp_error(failure: Failure, virtual: str) -> ftp.FTPCmdError:
    """The FTP reply for a failed file operation on ``virtual``.

    Only the session's own path is named, never a real path or a reason
    that tells whether something exists outside the jail.
    """
    error = failure.value
    if isinstance(error, ftp.FTPCmdError):
        return error
    if isinstance(error, PermissionDenied):
        return ftp.PermissionDeniedError(virtual)
    if isinstance(error, (OutsideJail, FileNotFoundError)):
        return ftp.FileNotFoundError(virtual)
    if isinstance(error, OffsetPastEnd):
        return FTPReplyError(554, f"Requested action not taken: invalid REST parameter ({error}).")
    if isinstance(error, InvalidPath):
        return FTPReplyError(553, f"File name not allowed: {error}.")
    if isinstance(error, IsADirectoryError):
        return FTPReplyError(550, f"{virtual}: Is a folder.")  # Twisted's says "is a directory", beside our "Not a folder."
    if isinstance(error, NotADirectoryError):
        return FTPReplyError(550, f"{virtual}: Not a folder.")
    if isinstance(error, FileExistsError):
        return ftp.FileExistsError(virtual)
    if isinstance(error, PermissionError):
        return ftp.PermissionDeniedError(virtual)
    if isinstance(error, BlockingIOError):
        return FTPReplyError(450, f"{virtual}: File busy: another session is uploading it.")
    if isinstance(error, OSError):
        if error.errno == errno.ENOTEMPTY:
            return FTPReplyError(550, f"{virtual}: Folder not empty.")
        if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return FTPReplyError(452, "Requested action aborted: insufficient storage space.")
        if error.errno == errno.ENAMETOOLONG:
            return FTPReplyError(553, "File name not allowed: the name is too long.")
        if error.errno == errno.EROFS:  # a home folder on a file system mounted read-only
            return FTPReplyError(550, f"{virtual}: Read-only file system.")
        if error.errno in (errno.ELOOP, errno.EXDEV, errno.EINVAL):
            return FTPReplyError(550, f"{virtual}: Requested action not taken.")
    _log.failure("unexpected error on {path}", failure, path=printable(virtual))
    return FTPReplyError(451, "Requested action aborted: local error in processing.")


# -- the shell -------------------------------------------------------------------------


def virtual_name(segments: Sequence[str]) -> str:
    """Join Twisted's path segments into the session path; refuse unusable names.

    Bytes that are not UTF-8 arrive as surrogate escapes (the control
    channel is decoded so) and name the file with those bytes on disk, as
    the listings send them: such a file can be fetched, renamed or deleted.
    A new name must be UTF-8 (the jail's ``check_new_name``).
    """
    names = []
    for segment in segments:
        if isinstance(segment, bytes):
            segment = segment.decode("utf-8", "surrogateescape")
        if NOT_A_BYTE.search(segment):
            raise InvalidPath("the name is not valid UTF-8")
        if "\r" in segment or "\n" in segment:
            raise InvalidPath("the name contains a line break")
        if "/" in segment or "\0" in segment:
            raise InvalidPath("the name contains '/' or a NUL byte")
        names.append(segment)
    return "/" + "/".join(names)


def stat_values(result: os.stat_result, keys: Iterable[str], owner: str, group: str) -> list[Any]:
    """The values of ``keys`` (Twisted's IFTPShell.list keys) for one stat result.

    ``owner`` and ``group`` are the session's (``Account.listing_owner``), as
    SFTP listings show them: the files belong to the server's system user.
    """
    values: list[Any] = []
    for key in keys:
        if key == "size":
            values.append(result.st_size)
        elif key == "directory":
            values.append(stat_module.S_ISDIR(result.st_mode))
        elif key == "permissions":
            values.append(filepath.Permissions(stat_module.S_IMODE(result.st_mode)))
        elif key == "hardlinks":
            values.append(result.st_nlink)
        elif key == "modified":
            values.append(result.st_mtime)
        elif key == "owner":
            values.append(owner)
        elif key == "group":
            values.append(group)
        else:
            raise ValueError(f"unknown stat key {key!r}")
    return values


MLST_FACTS = ("type", "size", "modify", "perm")  # offered, in this order (FEAT, OPTS MLST)
# RFC 3659 7.5.5 "perm" letters and the permission each needs.
_FILE_PERMS = (
    ("a", Permission.WRITE), ("d", Permission.DELETE_FILE), ("f", Permission.RENAME),
    ("r", Permission.READ), ("w", Permission.WRITE),
)
_FOLDER_PERMS = (
    ("c", Permission.WRITE), ("d", Permission.DELETE_FOLDER), ("e", None), ("f", Permission.RENAME),
    ("l", Permission.LIST), ("m", Permission.CREATE_FOLDER), ("p", Permission.DELETE_FILE),
)
_LINK_PERMS = (("d", Permission.DELETE_FILE), ("f", Permission.RENAME))  # what acts on a link itself (DELE, RNFR)
# A link target a fact can carry: ";" ends a fact, a space starts the name, control characters end lines.
_FACT_SAFE = re.compile(r"[^;\s\x00-\x1f\x7f]+")


def _link_type(link: str) -> str:
    """The ``type`` fact of a symlink: ``OS.unix=slink:<target>`` (RFC 3659's example, which FileZilla and
    lftp read), or ``OS.unix=symlink`` (its grammar) when the target cannot be written in a fact."""
    return f"OS.unix=slink:{link}" if _FACT_SAFE.fullmatch(link) else "OS.unix=symlink"


def mlsx_facts(
    result: os.stat_result, permissions: frozenset, facts: Sequence[str] = MLST_FACTS, home: bool = False,
    link: Optional[str] = None,
) -> str:
    """The RFC 3659 facts of one entry (``type=file;size=3;...;``), those of ``facts`` only.

    ``home``: the entry is the session's ``/``, which can be neither deleted nor renamed (no ``d``, no ``f``).
    ``link``: the entry is a symlink to that (:class:`Listed`): its type says so, and it has no size.
    """
    folder = stat_module.S_ISDIR(result.st_mode)
    if link is not None:
        kind, size, letters = _link_type(link), None, _LINK_PERMS
    elif folder:
        kind, size, letters = "dir", None, _FOLDER_PERMS
    else:
        kind, size, letters = "file", str(result.st_size), _FILE_PERMS
    values = {
        "type": kind,
        "size": size,
        "modify": time.strftime("%Y%m%d%H%M%S", time.gmtime(result.st_mtime)),
        "perm": "".join(
            letter
            for letter, needed in letters
            if (needed is None or needed in permissions) and not (home and letter in "df")
        ),
    }
    return "".join(f"{name}={values[name]};" for name in facts if values[name] is not None)


_LineFormat = Callable[[Listed], bytes]  # one listing entry's line, without CRLF


def listing_name(name: str) -> bytes:
    """A name as listings send it: control characters as ``?`` (as ``ls -q`` shows them).

    A name holding a line break (made over SFTP, or on the disk) would
    otherwise forge listing lines, and an escape sequence would reach the
    client's terminal.
    """
    return disk_bytes(CONTROL_CHARACTERS.sub("?", name))


def list_line(
    name: str, result: os.stat_result, owner: str, group: str, this_year: int, link: Optional[str] = None
) -> bytes:
    """One ``LIST`` line as Twisted wrote it: ``ls -l`` in UTC, the year instead of the time for other years.

    A symlink (``link``: what it points to, :class:`Listed`) is ``lrwxrwxrwx ... name -> target``, as ``ls -l`` shows it.
    """
    moment = time.gmtime(result.st_mtime)
    day = f"{MONTHS[moment.tm_mon - 1]} {moment.tm_mday:02d}"
    when = f"{day} {moment.tm_hour:02d}:{moment.tm_min:02d}" if moment.tm_year == this_year else f"{day} {moment.tm_year:5d}"
    kind = "l" if link is not None else "d" if stat_module.S_ISDIR(result.st_mode) else "-"
    mode = stat_module.filemode(stat_module.S_IMODE(result.st_mode))[1:]
    text = f"{kind}{mode}{result.st_nlink:4d} {owner[:8]:<9} {group[:8]:<9} {result.st_size:15d} {when:>12} "
    line = text.encode("utf-8", "replace") + listing_name(name)
    return line if link is None else line + b" -> " + listing_name(link)


def render_listing(entries: Iterable[Listed], line: _LineFormat, glob: Optional[str]) -> bytes:
    """The lines of the entries whose name matches ``glob`` (all without one), CRLF after each."""
    return b"".join(
        line(entry) + b"\r\n" for entry in entries if glob is None or fnmatch.fnmatchcase(entry.name, glob)
    )


class ListingFile:
    """A listing read like a file (:class:`FileDownload` sends it): each read stat-s and formats the next entries.

    Blocking: read and close in the thread pool.
    """

    batch = 256  # entries stat-ed per step

    def __init__(self, reader: FolderReader, line: _LineFormat, glob: Optional[str]):
        self._reader, self._line, self._glob = reader, line, glob

    def read(self, size: int = -1) -> bytes:
        """About ``size`` bytes of lines (whole lines; all of them when negative); b"" at the end."""
        chunks: list[bytes] = []
        total = 0
        while (size < 0 or total < size) and not self._reader.finished:
            chunk = render_listing(self._reader.read(self.batch), self._line, self._glob)
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._reader.close()


@implementer(ftp.IFTPShell)
class JailedFTPShell:
    """IFTPShell of one session: Twisted's segment lists on a JailedFilesystem."""

    def __init__(self, filesystem: JailedFilesystem, owner: tuple[str, str] = ("ftp", "ftp")):
        self.filesystem = filesystem
        self.owner, self.group = owner  # what listings show (Account.listing_owner)

    def _call(self, segments: Sequence[str], operation: Callable[[str], defer.Deferred]) -> defer.Deferred:
        try:
            virtual = virtual_name(segments)
        except InvalidPath:
            return defer.fail(ftp_error(Failure(), "/"))
        deferred = defer.maybeDeferred(operation, virtual)
        deferred.addErrback(lambda failure: _raise(ftp_error(failure, virtual)))
        return deferred

    def makeDirectory(self, path):
        return self._call(path, self.filesystem.make_directory)

    def removeDirectory(self, path):
        return self._call(path, self.filesystem.remove_directory)

    def removeFile(self, path):
        return self._call(path, self.filesystem.remove_file)

    def rename(self, fromPath, toPath):
        try:
            target = virtual_name(toPath)
        except InvalidPath:
            return defer.fail(ftp_error(Failure(), "/"))

        def target_error(failure: Failure, source: str):
            """What is wrong with the target names the target, not the source."""
            if failure.check(FileExistsError):
                raise ftp.FileExistsError(target)
            if failure.check(FileNotFoundError) and failure.value.filename == target:
                raise ftp.FileNotFoundError(target)  # the target's folder is missing
            if failure.check(OSError) and failure.value.errno == errno.EINVAL:
                raise FTPReplyError(550, f"{target}: a folder cannot be moved into itself.")
            if failure.check(PermissionDenied) and failure.value.path == target:
                raise ftp.PermissionDeniedError(target)  # replacing it needs allow-delete-file
            if failure.check(OutsideJail) and not _on_path(failure.value.virtual_path, source):
                raise ftp.FileNotFoundError(target)  # the target, or a folder of it, leads outside
            return failure

        return self._call(
            fromPath, lambda source: self.filesystem.rename(source, target).addErrback(target_error, source)
        )

    def checkRenameSource(self, path):
        """Not in IFTPShell: RNFR's check that the source may be renamed and exists, in the thread pool.

        It exists as :meth:`rename` takes it: a link itself (also a dangling
        one), inside the jail; a link leading outside is "no such file".
        """

        def check(virtual: str) -> defer.Deferred:
            def checked() -> defer.Deferred:
                self.filesystem.require(Permission.RENAME, virtual)
                return self.filesystem.run(_require_entry, self.filesystem.root, virtual)

            def refused(failure: Failure) -> defer.Deferred:
                # Logged here, as the rename it ends; RNTO logs the rename itself.
                return self.filesystem.log_change(defer.fail(failure), "rename", virtual)

            return defer.maybeDeferred(checked).addErrback(refused)

        return self._call(path, check)

    def access(self, path):
        """CWD's check (no permission needed): a folder; a file is "Not a folder", as for RMD, and only a missing name "No such file"."""

        def check(virtual: str) -> defer.Deferred:
            def is_directory(answer: bool) -> Optional[defer.Deferred]:
                if answer:
                    return None
                exists = self.filesystem.require_existing(virtual)  # FileNotFoundError when nothing is there
                return exists.addCallback(lambda ignored: _raise(NotADirectoryError(errno.ENOTDIR, "not a folder")))

            return self.filesystem.is_directory(virtual).addCallback(is_directory)

        return self._call(path, check)

    def stat(self, path, keys=()):
        keys = tuple(keys)

        def values(result: os.stat_result):
            return stat_values(result, keys, self.owner, self.group)

        return self._call(path, lambda virtual: self.filesystem.stat(virtual).addCallback(values))

    def list(self, path, keys=()):
        keys = tuple(keys)

        def entries(listing: list[Listed]) -> list[tuple[str, list[Any]]]:
            return [(entry.name, stat_values(entry.result, keys, self.owner, self.group)) for entry in listing]

        return self._call(path, lambda virtual: self.filesystem.list_directory(virtual).addCallback(entries))

    def facts(self, path, facts: Sequence[str] = MLST_FACTS):
        """Not in IFTPShell: MLST's facts of one path."""
        permissions = self.filesystem.permissions
        return self._call(
            path,
            lambda virtual: self.filesystem.stat(virtual).addCallback(mlsx_facts, permissions, facts, virtual == "/"),
        )

    def listing(self, path, line: _LineFormat, glob: Optional[str] = None, folder_only: bool = False) -> defer.Deferred:
        """Not in IFTPShell: a folder's listing, as a :class:`FileDownload` of the bytes its data connection carries.

        ``line(entry)`` formats one :class:`Listed` entry. The folder's names
        are read and sorted in the thread pool, and each chunk is stat-ed and
        formatted there as the data connection takes it (:class:`ListingFile`):
        a folder of 200,000 entries formatted on the reactor stopped every
        other session for seconds, and formatted at once it held tens of MB
        per session. ``folder_only``: a file is refused with 501 (MLSD, RFC
        3659 7.2.1), not listed as itself.
        """

        def opened(reader: FolderReader) -> FileDownload:
            return FileDownload(self.filesystem, ListingFile(reader, line, glob))

        def not_a_folder(failure: Failure, virtual: str):
            failure.trap(NotADirectoryError)
            raise FTPReplyError(501, f"{virtual}: Not a folder (MLST gives the facts of a file).")

        def list_(virtual: str) -> defer.Deferred:
            listed = self.filesystem.open_listing(virtual, folder_only=folder_only).addCallback(opened)
            return listed.addErrback(not_a_folder, virtual) if folder_only else listed

        return self._call(path, list_)

    def setModificationTime(self, path, modified: float):
        """Not in IFTPShell: MFMT (needs allow-write, as SFTP's setstat does); gives the time stored."""
        return self._call(
            path,
            lambda virtual: self.filesystem.set_times(virtual, modified, modified).addCallback(
                lambda result: result.st_mtime
            ),
        )

    def openForReading(self, path, offset: int = 0):
        def opened(file) -> "FileDownload":
            return FileDownload(self.filesystem, file)

        return self._call(path, lambda virtual: self.filesystem.open_for_reading(virtual, offset=offset).addCallback(opened))

    def openForWriting(self, path, append: bool = False, offset: int = 0):
        def open_(virtual: str) -> defer.Deferred:
            return self.filesystem.open_for_writing(virtual, append=append, offset=offset).addCallback(
                lambda file: FileUpload(self.filesystem, file, virtual)
            )

        return self._call(path, open_)


def _raise(error: BaseException):
    raise error


def _on_path(folder: str, virtual: str) -> bool:
    """Whether ``folder`` is ``virtual`` or one of the folders above it (both session paths)."""
    return virtual == folder or virtual.startswith(folder.rstrip("/") + "/")


def _require_entry(root: str, virtual: str) -> None:
    """FileNotFoundError unless ``virtual`` names an entry inside ``root`` that can be renamed (blocking: call it in a thread).

    The home folder itself cannot be (PermissionError, as RNTO would answer).
    """
    real = resolve_entry(root, virtual)
    refuse_home_folder(root, real, "renamed")
    if not os.path.lexists(real):
        raise FileNotFoundError(errno.ENOENT, "no such file or folder", virtual)


# -- file data, in the thread pool -----------------------------------------------------


@implementer(ftp.IReadFile, interfaces.IPushProducer)
class FileDownload:
    """Streams an open file to a consumer, reading each chunk in a thread.

    One read is in flight at a time and none while the consumer is paused,
    so a slow client never makes the server buffer the file in memory.
    """

    chunk_size = 64 * 1024

    def __init__(self, filesystem: JailedFilesystem, file):
        self._filesystem = filesystem
        self._file = file
        self._consumer = None
        self._done: Optional[defer.Deferred] = None
        self._outcome: Optional[Failure] = None
        self._paused = False
        self._reading = False
        self._looping = False
        self._finished = False

    def discard(self) -> defer.Deferred:
        """Close the file without sending it (the data connection was refused)."""
        if self._done is not None:
            raise RuntimeError("discard() after send()")
        self._done = defer.Deferred()
        self._finished = True
        return self._filesystem.run(self._file.close)

    def send(self, consumer) -> defer.Deferred:
        if self._done is not None:
            raise RuntimeError("send() may only be called once")
        self._done = defer.Deferred()
        self._consumer = consumer
        consumer.registerProducer(self, True)  # may call stopProducing at once
        self._read_more()
        return self._done

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._read_more()

    def stopProducing(self) -> None:
        self._finish(Failure(internet_error.ConnectionLost("the data connection was closed")), unregister=False)

    def _read_more(self) -> None:
        if self._looping:
            return  # a synchronous read finished inside the loop below
        self._looping = True
        try:
            while not (self._paused or self._reading or self._finished):
                self._reading = True
                reading = self._filesystem.run(self._file.read, self.chunk_size)
                reading.addCallbacks(self._chunk_read, self._read_failed)
        finally:
            self._looping = False

    def _chunk_read(self, data: bytes) -> None:
        self._reading = False
        if self._finished:
            self._close_file()  # stopped while this read was in flight
            return
        if not data:
            self._finish(None, unregister=True)
            return
        self._consumer.write(data)
        self._read_more()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self._finished:
            self._close_file()
            return
        self._finish(failure, unregister=True)

    def _finish(self, outcome: Optional[Failure], unregister: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self._outcome = outcome
        if unregister:
            self._consumer.unregisterProducer()
        if not self._reading:
            self._close_file()

    def _close_file(self) -> None:
        closing = self._filesystem.run(self._file.close)
        closing.addErrback(lambda failure: None)  # closing a file read from loses nothing
        closing.addCallback(lambda ignored: self._done.callback(None) if self._outcome is None else self._done.errback(self._outcome))


@implementer(ftp.IWriteFile, interfaces.IConsumer)
class FileUpload:
    """A consumer writing received data to an open file in a thread, in order.

    Data waiting for the disk is bounded: above ``high_water`` bytes the
    producer (the data connection) is paused until writes catch up.
    """

    high_water = 1024 * 1024
    low_water = 256 * 1024

    def __init__(self, filesystem: JailedFilesystem, upload: PreparedUpload, virtual: str = ""):
        self._filesystem = filesystem
        self._upload = upload
        self._file = upload.file
        self._virtual = virtual
        self._begun = False  # the data may flow: until then the file is as it was
        self._got_data = False  # a byte arrived: a failed upload then keeps what it wrote (to resume it)
        self._queue: list[bytes] = []
        self._pending = 0  # bytes received and not yet written
        self._written_bytes = 0  # bytes on disk (for the log line of a failed write)
        self._writing = False
        self._error: Optional[Failure] = None
        self._producer = None
        self._producer_paused = False
        self._received = False
        self._closing: Optional[defer.Deferred] = None
        self._idle_waiters: list[defer.Deferred] = []

    @property
    def write_failed(self) -> bool:
        """A write to the file failed: :meth:`close` reports that error, whatever ended the data connection."""
        return self._error is not None

    # IWriteFile
    def receive(self) -> defer.Deferred:
        if self._received:
            raise RuntimeError("receive() may only be called once")
        self._received = True
        return defer.succeed(self)

    def begin(self) -> None:
        """The data connection may carry data (its TLS handshake passed): the file is emptied (or cut at the
        resumed offset) before the first write, or at :meth:`close` for an empty upload."""
        self._begun = True

    def close(self, failed: bool = False) -> defer.Deferred:
        """Wait for pending writes, close the file; fail with the first error.

        An upload that never began (its data connection was refused), or
        ``failed`` before its first byte (cut off, ABOR), leaves the file as
        it was, and removes it if opening it created it.
        """
        if self._closing is not None:
            return self._closing
        idle = defer.Deferred()
        self._idle_waiters.append(idle)
        self._write_more()
        abandon = not self._begun or (failed and not self._got_data)
        closing = idle.addCallback(
            lambda ignored: self._filesystem.abandon_upload(self._upload, self._virtual) if abandon
            else self._filesystem.run(self._finish)
        )
        closing.addBoth(lambda result: self._error if self._error is not None else result)
        closing.addErrback(lambda failure: _raise(ftp_error(failure, self._virtual or "/")))
        self._closing = closing
        return closing

    # IConsumer
    def registerProducer(self, producer, streaming) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    def write(self, data: bytes) -> None:
        # Never raises: Twisted's DTP fires its Deferred twice if it does.
        self._begun = True
        self._got_data = self._got_data or bool(data)
        if self._error is not None or self._closing is not None:
            return
        self._queue.append(bytes(data))
        self._pending += len(data)
        if self._pending >= self.high_water and self._producer is not None and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()
        self._write_more()

    def _write_more(self) -> None:
        if self._writing:
            return
        if not self._queue:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        data = b"".join(self._queue)
        self._queue.clear()
        self._writing = True
        writing = self._filesystem.run(self._write_to_file, data)
        writing.addCallbacks(self._written, self._write_failed, callbackArgs=(len(data),))

    def _write_to_file(self, data: bytes) -> None:
        """In a thread, one at a time."""
        self._upload.begin()
        self._file.write(data)

    def _finish(self) -> None:
        """In a thread: an upload of no bytes empties the file too."""
        try:
            self._upload.begin()
        finally:
            self._file.close()

    def _written(self, ignored, size: int) -> None:
        self._writing = False
        self._pending -= size
        self._written_bytes += size
        if self._producer_paused and self._pending <= self.low_water and self._producer is not None:
            self._producer_paused = False
            self._producer.resumeProducing()
        self._write_more()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        self._error = failure
        self._filesystem.log_failed_write(self._virtual or "/", failure.value, self._written_bytes)
        self._queue.clear()
        self._pending = 0
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        self._write_more()  # wakes close()


@implementer(interfaces.IConsumer)
class _PassingConsumer:
    """A consumer in front of another: the producer is the other's; ``write`` is what a subclass makes of data."""

    def __init__(self, consumer):
        self._consumer = consumer

    def registerProducer(self, producer, streaming) -> None:
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        raise NotImplementedError


class _ProgressConsumer(_PassingConsumer):
    """Passes data on and tells the control connection a transfer is alive."""

    def __init__(self, consumer, on_progress: Callable[[], None]):
        super().__init__(consumer)
        self._on_progress = on_progress

    def write(self, data: bytes) -> None:
        self._on_progress()
        self._consumer.write(data)


class _IndentedLines(_PassingConsumer):
    """The control connection as STAT's consumer: each listing line (chunks hold whole lines) after a space."""

    def write(self, data: bytes) -> None:
        self._consumer.writeSequence([b" " + line + b"\r\n" for line in data.splitlines()])


# -- the protocol ----------------------------------------------------------------------


def _strip_list_options(path: str) -> str:
    """``LIST -la dir`` as ``dir``: clients send ls options the server ignores."""
    path = path.strip()
    while path.startswith("-"):
        _, _, path = path.partition(" ")
        path = path.lstrip()
    return path


_TELNET_COMMAND_BYTES = range(0xF0, 0x100)  # SE ... IAC (RFC 854)
_TELNET_IAC = 0xFF
_TELNET_OPTION_VERBS = range(0xFB, 0xFF)  # WILL, WONT, DO, DONT: an option byte follows


def strip_telnet_commands(line: bytes) -> bytes:
    """``line`` without the Telnet commands before the FTP command (RFC 854), and byte 255 as sent, once.

    RFC 959 clients send ABOR behind ``IAC IP IAC DM`` (interrupt, synch),
    with a byte of it as TCP urgent data; a Telnet client negotiates options
    (``IAC DO option``). A lone ``IAC`` or command byte, the rest of the
    sequence lost on the way (a proxy dropping urgent data), goes too: no FTP
    command starts with a byte from 0xF0 up. In a path, byte 255 (``IAC``)
    comes doubled from clients that follow RFC 959 (lftp) and is one byte
    of the name, as ProFTPD reads it (a UTF-8 name never has it).
    """
    start = 0
    while start < len(line) and line[start] in _TELNET_COMMAND_BYTES:
        verb = line[start + 1 : start + 2]
        start += 3 if line[start] == _TELNET_IAC and verb and verb[0] in _TELNET_OPTION_VERBS else 1
    return line[start:].replace(b"\xff\xff", b"\xff")


def keep_urgent_data_inline(transport) -> bool:
    """Set SO_OOBINLINE on the socket under ``transport`` (through TLS and wrappers); whether it was found.

    Python's ``ftplib.FTP.abort()`` sends ``ABOR`` CRLF with MSG_OOB: its
    last byte (LF) is TCP urgent data, which the kernel otherwise takes out of
    the stream, so the line never ended and the next command was glued to
    it. Inline, urgent bytes are ordinary bytes of the command line.
    """
    for _ in range(8):  # the TCP connection, the connection guard, TLS: never deeper
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket):
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
            except OSError:
                return False
            return True
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
    return False


class _DataChannel(ftp.DTP):
    """Twisted's DTP, except that an upload cut off by a reset is not a success.

    Twisted's DTP reports every end of the data connection as the end of
    the upload; a connection that ends with an error (reset, timeout) fails
    the STOR with 426 here.
    """

    refusal: Optional[DataChannelRefused] = None
    aborted = False  # cut by the client's ABOR (or QUIT)

    def connectionLost(self, reason) -> None:
        self.isConnected = False
        waiting = self._onConnLost
        if waiting is None or waiting.called:
            return
        if reason.check(internet_error.ConnectionDone):
            waiting.callback(None)
        else:
            waiting.errback(reason)

    def when_secured(self) -> defer.Deferred:
        """Fires when data may be sent: at once on a plain data connection."""
        return defer.succeed(None)


@implementer(IHandshakeListener)
class _ProtectedDataChannel(_DataChannel):
    """A ``PROT P`` data connection: usable once its TLS handshake passed the checks.

    Twisted's TLS layer calls :meth:`handshakeCompleted` before it lets any
    buffered data out, so a refused connection never carries a byte of
    data; on top of that this channel holds everything written to it
    until then.
    """

    _verified = False
    _handshake_timeout = None

    def connectionMade(self) -> None:
        self._waiters: list[defer.Deferred] = []
        self._held: list[bytes] = []
        super().connectionMade()
        self._handshake_timeout = self.factory._reactor.callLater(DATA_HANDSHAKE_TIMEOUT, self._handshake_too_slow)

    def handshakeCompleted(self) -> None:
        self._cancel_timeout()
        refusal = self.pi._check_data_tls(self.transport)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._verified = True
        held, self._held = self._held, []
        for data in held:
            self.transport.write(data)
        self._settle()

    def _handshake_too_slow(self) -> None:
        self._handshake_timeout = None
        self.pi._tls_refusal("tls-handshake-failed", detail=f"a data connection: no TLS handshake within {DATA_HANDSHAKE_TIMEOUT}s")
        self._refuse(DataChannelRefused(522, "Data connection closed: no TLS handshake in time (use PROT P only with a TLS client)."))

    def _cancel_timeout(self) -> None:
        if self._handshake_timeout is not None and self._handshake_timeout.active():
            self._handshake_timeout.cancel()
        self._handshake_timeout = None

    def _refuse(self, refusal: DataChannelRefused) -> None:
        if self.refusal is None and not self._verified:
            self.refusal = refusal
            self._held = []
            if self.transport is not None:
                self.transport.abortConnection()
        self._settle()

    def _settle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._answer(waiter)

    def _answer(self, waiter: defer.Deferred) -> None:
        if self.refusal is not None:
            waiter.errback(self.refusal)
        else:
            waiter.callback(None)

    def when_secured(self) -> defer.Deferred:
        waiter = defer.Deferred()
        if self._verified or self.refusal is not None:
            self._answer(waiter)
        else:
            self._waiters.append(waiter)
        return waiter

    def write(self, data) -> None:
        if self.refusal is not None:
            return
        if not self._verified:
            self._held.append(bytes(data))
            return
        super().write(data)

    def sendLine(self, line) -> None:
        self.write(line + b"\r\n")

    def dataReceived(self, data) -> None:
        if self._verified:
            super().dataReceived(data)

    def connectionLost(self, reason) -> None:
        self._cancel_timeout()
        if not self._verified and self.refusal is None and self.aborted:
            # ABOR during the handshake: the client cancelled the transfer, TLS did not fail (RFC 959: 426, then 226)
            self.refusal = DataChannelRefused(426, "Connection closed; transfer aborted.")
        elif not self._verified and self.refusal is None:
            _log.info(
                "FTP service {service}: a protected data connection ended before its TLS handshake: {reason}",
                service=self.pi.factory.settings.id,
                reason=reason.getErrorMessage(),
            )
            if reason.check(SSL.Error):  # not a client that closed an unused data connection
                self.pi._tls_refusal("tls-handshake-failed", detail=f"a data connection: {openssl_reason(reason.value)}")
            self.refusal = DataChannelRefused(522, "Data connection failed: the TLS handshake did not complete.")
        self._settle()
        if self._verified and not reason.check(internet_error.ConnectionDone) and self._peer_closed_tls():
            # The client ended the data with TLS close_notify and then closed the
            # socket before our own close_notify reached it: a complete upload.
            reason = Failure(internet_error.ConnectionDone("TLS close_notify received"))
        super().connectionLost(reason)

    def _peer_closed_tls(self) -> bool:
        """The client sent close_notify: the data it sent is complete (no truncation)."""
        try:
            return bool(self.transport.getHandle().get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        except Exception:  # the TLS connection is already gone
            return False


class _DataChannelFactory(ftp.DTPFactory):
    """Accepts the data connection only from the control connection's address.

    Also quiet: Twisted's DTPFactory logs several lines per transfer.
    """

    noisy = False
    protected = False  # PROT P: the channel speaks TLS (wrapped by _ProtectedDataFactory)

    def buildProtocol(self, addr):
        if self._state is not self._IN_PROGRESS:
            return None
        if self.peerHost is not None and plain_address(getattr(addr, "host", "")) != plain_address(self.peerHost):
            _log.warn(
                "FTP data connection from {host} refused: the control connection is from {peer}",
                host=getattr(addr, "host", "?"),
                peer=self.peerHost,
            )
            return None
        self._state = self._FINISHED
        self.cancelTimeout()
        dtp = _ProtectedDataChannel() if self.protected else _DataChannel()
        dtp.factory = self
        dtp.pi = self.pi
        self.pi.dtpInstance = dtp
        return dtp

    def stopFactory(self) -> None:
        self.cancelTimeout()

    def setTimeout(self, seconds: float) -> None:
        self.delayedCall = self._reactor.callLater(seconds, self.timeoutFactory)

    def cancelTimeout(self) -> None:
        if self.delayedCall is not None and self.delayedCall.active():
            self.delayedCall.cancel()

    def timeoutFactory(self) -> None:
        self.give_up(defer.TimeoutError("no data connection in time"))

    def give_up(self, reason: Optional[Exception] = None) -> None:
        """Stop waiting for the data connection: the transfer waiting for it answers 425."""
        if self._state is not self._IN_PROGRESS:
            return
        self._state = self._FAILED
        self.cancelTimeout()
        self.deferred.errback(ftp.PortConnectionError(reason or RuntimeError("ABOR")))


class _QuietPort(tcp.Port):
    """A passive data port that logs nothing of its own.

    Twisted's ``tcp.Port`` logs ``_DataChannelFactory starting on N`` when it
    opens and ``(TCP Port N Closed)`` when it closes: two lines per FTP
    transfer that tell an administrator nothing (the transfer has its own
    audit and log lines). The closing line has its own method; the opening
    one is written by ``startListening`` through the legacy log, which merges
    in the caller's log context: an empty ``log_format`` there makes it an
    event without text, which log observers (twistd's log file, a worker's
    output) write nothing for.
    """

    def startListening(self) -> None:
        legacy_log.callWithContext({"log_format": ""}, super().startListening)

    def _logConnectionLostMsg(self) -> None:
        pass


class _ProtectedDataFactory(TLSMemoryBIOFactory):
    """TLS (server side, also for active connections) around a ``_DataChannelFactory``.

    ``options`` are the control connection's: the data connection can only
    resume a TLS session of that connection.
    """

    noisy = False

    def __init__(self, options: IOpenSSLServerConnectionCreator, channels: _DataChannelFactory):
        super().__init__(options, False, channels)

    def buildProtocol(self, addr):
        channel = self.wrappedFactory.buildProtocol(addr)
        if channel is None:  # refused: another address, or a second connection
            return None
        return self.protocol(self, channel)


@implementer(IOpenSSLServerConnectionCreator)
class _ImplicitTLS:
    """Implicit FTPS: each control connection gets a TLS session (context) of its own."""

    def __init__(self, tls: ServerTLS):
        self._tls = tls

    def serverConnectionForTLS(self, tlsProtocol):
        options = self._tls.new_session()
        tlsProtocol.wrappedProtocol.tls_options = options
        return options.serverConnectionForTLS(tlsProtocol)


@functools.lru_cache(maxsize=None)
def _command_signature(function) -> inspect.Signature:
    """The arguments of an ``ftp_*`` function without ``self``: computed once, not per command."""
    signature = inspect.signature(function)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


class SftpauthFTP(ftp.FTP):
    """One FTP control connection."""

    _encoding = "utf-8"
    PUBLIC_COMMANDS = ["FEAT", "QUIT", "OPTS", "NOOP", "AUTH", "PBSZ", "PROT", "CCC", "HELP"]
    FEATURES = ["EPRT", "EPSV", "MDTM", "MFMT", "PASV", "REST STREAM", "SIZE", "TYPE A;I", "UTF8"]
    _mlst_facts = MLST_FACTS  # OPTS MLST chooses among them
    MAX_LENGTH = 16384  # longer command lines are refused and the connection closed
    delimiter = b"\n"  # a line may end in CRLF (RFC 959) or a bare LF (printf, nc, many scripts); replies end in CRLF

    factory: "FTPServiceFactory"
    workingDirectory: list[str]
    _logout: Optional[Callable[[], None]] = None
    _lost = False
    _closing_port: Optional[defer.Deferred] = None  # the passive port being closed (see _listen_passive)
    # The TLS options (own context) of this connection once TLS is on: after
    # AUTH TLS, or set by _ImplicitTLS before connectionMade.
    tls_options: Optional[IOpenSSLServerConnectionCreator] = None
    _pbsz = False
    _protection = "C"  # PROT: "C" clear or "P" private data connections
    _close_deadline = None  # the abort of a connection being closed (_close_connection)
    _restart = 0  # REST: the offset of the next RETR or STOR
    _running: Optional[defer.Deferred] = None  # the command being answered
    _login_deadline = None  # closes a connection that has not logged in within LOGIN_GRACE_SECONDS
    _end_reason = ""  # why the connection is ending: the session-end's reason

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.workingDirectory = []
        self._queued: collections.deque[str] = collections.deque()  # commands read while one runs
        self._login_deadline = self.factory.reactor.callLater(LOGIN_GRACE_SECONDS, self._login_too_slow)
        if self.tls_options is not None:  # implicit FTPS: every channel protected from the start
            self._protection = "P"
        keep_urgent_data_inline(self.transport)
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        self._lost = True
        if self.tls_options is not None and reason.check(SSL.Error) and not handshake_finished(self.transport):
            # Implicit FTPS, or after AUTH TLS: a client that cannot or will not speak our TLS.
            self._tls_refusal("tls-handshake-failed", detail=openssl_reason(reason.value))
        if not self._end_reason:
            self._end_reason = "connection-closed" if reason.check(internet_error.ConnectionDone) else "connection-lost"
        self._cancel_login_deadline()
        call, self._close_deadline = self._close_deadline, None
        if call is not None and call.active():
            call.cancel()
        self._abort_data_connection()
        super().connectionLost(reason)
        self._end_session()

    def _close_connection(self, why: str = "") -> None:
        """Close once the replies are sent, and make sure the socket does go away.

        ``why`` becomes the ``reason`` of the session-end (sftpauth.realm.SESSION_END_REASONS).

        A TLS close waits for the client's close_notify, which is read only
        while reading is on: commands are read one at a time (reading is
        paused during each), so after QUIT or a closing 421 reading is turned
        back on, with what arrives discarded (:meth:`dataReceived`). A client
        that never closes is cut off after :data:`CLOSE_GRACE_SECONDS`.
        Without this, lftp and curl left an FTPS session open after 221.
        """
        if self._close_deadline is not None or self.transport is None:
            return
        self._end_reason = self._end_reason or why
        self.disconnected = True
        self.setTimeout(None)
        transport = self.transport
        transport.resumeProducing()  # first: a transport that is disconnecting does not resume
        transport.loseConnection()
        self._close_deadline = self.factory.reactor.callLater(CLOSE_GRACE_SECONDS, transport.abortConnection)

    def dataReceived(self, data) -> None:
        if self.disconnected:
            return  # after QUIT or a closing reply nothing is a command any more
        super().dataReceived(data)

    def _login_too_slow(self) -> None:
        """An unauthenticated connection holds a descriptor: it gets as long as on SSH, not the idle timeout."""
        self._login_deadline = None
        if self.state != self.AUTHED:
            self.sendLine(f"421 No login within {LOGIN_GRACE_SECONDS} seconds, closing the connection.")
            self._close_connection()

    def _cancel_login_deadline(self) -> None:
        call, self._login_deadline = self._login_deadline, None
        if call is not None and call.active():
            call.cancel()

    def ftp_QUIT(self):
        self.reply(ftp.GOODBYE_MSG)
        self._close_connection("logout")

    def _end_session(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            try:
                logout(self._end_reason)
            except Exception:
                _log.failure("FTP session logout failed")

    def timeoutConnection(self) -> None:
        self.sendLine(f"421 No activity for {self.timeOut} seconds, closing the connection.")
        self._abort_data_connection()
        self._close_connection("idle-timeout")

    def shutting_down(self) -> None:
        """sftpauth is stopping (sftpauth.listening.ListeningService): 421, as RFC 959 has it, then close."""
        self.sendLine("421 Service closing control connection: the server is shutting down.")
        self._abort_data_connection()
        self._close_connection("shutdown")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(f"500 Command line too long (at most {self.MAX_LENGTH} bytes).")
        if self.state in (self.UNAUTH, self.INAUTH):
            self._login_line_too_long(line)
        self._close_connection("protocol-error")

    def _login_line_too_long(self, line: bytes) -> None:
        """A USER or PASS line over MAX_LENGTH is a failed login, audited and counted toward a ban.

        Over SSH a username or password of that size reaches the chain, which
        refuses it (``invalid-username``, ``invalid-password``); here it goes
        to the chain too, so a guesser cannot try huge names unseen.
        """
        command, _, argument = line.lstrip(b" ").partition(b" ")
        text = argument.rstrip(b"\r").decode(self._encoding, "surrogateescape")
        if command.upper() == b"USER":
            username, password = text, ""
        elif command.upper() == b"PASS" and self.state == self.INAUTH:
            username, password = self.__dict__.pop("_user", ""), text
        else:
            return
        request, mind = self._login_request(username, password, truncated=True)
        # The chain's input check refuses both (over 256 characters, over 1,024): the session never starts.
        self.portal.login(request, mind, ftp.IFTPShell).addCallbacks(lambda result: result[2](), lambda failure: None)

    def _login_request(self, username: str, password: str, truncated: bool = False) -> tuple[LoginRequest, SessionInfo]:
        settings = self.factory.settings
        peer = self._peer()
        tls = self.tls_options is not None  # implicit FTPS, or after AUTH TLS
        request = LoginRequest(username=username, password=password, service_id=settings.id, protocol="ftp", peer=peer,
                               truncated=truncated, tls=tls)
        return request, SessionInfo(service_id=settings.id, protocol="ftp", peer=peer, tls=tls)

    def sendLine(self, line) -> None:
        if self.transport is None or self.disconnected:
            return  # the command finished after the client left, or after QUIT or a closing 421
        if isinstance(line, str):
            line = line.encode("utf-8", "replace")
        self.transport.write(line + b"\r\n")

    def _peer(self) -> str:
        return plain_address(self.transport.getPeer().host)

    def _tls_refusal(self, reason: str, username: str = "", detail: str = "") -> None:
        """Audit a refusal of the service's TLS policy (a ``connection`` event, at most one a minute per address)."""
        policy = self.factory.policy
        if policy is not None and self.transport is not None:
            policy.connection_refused(self.factory.settings.id, self._peer(), reason, username=username, detail=detail)

    # -- commands -----------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if line.endswith(b"\r"):
            line = line[:-1]
        text = strip_telnet_commands(line).decode("utf-8", "surrogateescape")
        if self._running is None and not self._queued:
            self._run(text)
            return
        # A command is running (a transfer, a login): RFC 959 lets ABOR and
        # QUIT through at once; the rest wait their turn, in order.
        command = text.partition(" ")[0].upper()
        if command == "QUIT":
            self._queued.clear()
            self._abort_data_connection()
            self.ftp_QUIT()  # the running command's answer is not sent any more
            return
        if command == "ABOR":
            self._queued.appendleft(text)  # answered right after the aborted command's 426
            self._abort_transfer()
        else:
            self._queued.append(text)
        if len(self._queued) >= MAX_QUEUED_COMMANDS:
            self.pauseProducing()

    def _run(self, text: str) -> None:
        """Answer one command; one that has to wait (a login, a transfer) holds the next ones back."""
        command, space, argument = text.partition(" ")
        arguments = (argument,) if space else ()
        deferred = defer.maybeDeferred(self.processCommand, command, *arguments)
        deferred.addCallbacks(self._send_result, self._send_failure, errbackArgs=(command,))
        deferred.addErrback(lambda failure: _log.failure("cannot answer an FTP command", failure))
        # Not ``deferred.called``: a Deferred that fired is still waiting when one of its
        # callbacks returned a Deferred that has not (PASV waiting for its old port to close).
        answered = []
        deferred.addBoth(answered.append)
        if not answered:
            self._running = deferred
            deferred.addBoth(self._command_done)

    def _command_done(self, ignored) -> None:
        self._running = None
        while self._running is None and self._queued and not self.disconnected and self.transport is not None:
            self._run(self._queued.popleft())
        if self.paused and len(self._queued) < MAX_QUEUED_COMMANDS and not self.disconnected and self.transport is not None:
            self.resumeProducing()  # also while a queued transfer runs: its ABOR must be read

    def _send_result(self, result) -> None:
        if result is None:
            return
        if isinstance(result, Reply):
            self.sendLine(result)
            return
        try:
            line = ftp.RESPONSE[result[0]] % tuple(result[1:]) if isinstance(result, tuple) else ftp.RESPONSE[result]
        except (KeyError, TypeError, IndexError):
            _log.error("no FTP reply text for {result!r}", result=result)
            line = "451 Requested action aborted: local error in processing."
        self.sendLine(line)

    def _send_failure(self, failure: Failure, command: str) -> None:
        if failure.check(ftp.FTPCmdError):
            self.sendLine(failure.value.response())
            return
        _log.failure("FTP command {command} failed unexpectedly", failure, command=command[:16].upper())
        self.sendLine("451 Requested action aborted: local error in processing.")

    def processCommand(self, cmd: str, *params: str):
        cmd = cmd.upper()
        if cmd not in ("REST", "RETR", "STOR"):
            self._restart = 0  # RFC 3659: REST applies to the transfer command right after it
        if self.state == self.RENAMING and cmd != "RNTO":
            # RFC 959: RNTO must come right after RNFR; any other command (NOOP too) ends the rename.
            self.state = self.AUTHED
            self.__dict__.pop("_fromName", None)
            if cmd not in self.PUBLIC_COMMANDS:
                return defer.fail(ftp.BadCmdSequenceError("RNTO required after RNFR"))
        if cmd in self.PUBLIC_COMMANDS:
            return self._call_command(cmd, params)
        if self.state == self.UNAUTH:
            if cmd == "USER":
                if self.tls_options is None and self._tls_required():
                    self._tls_refusal("tls-required", username=params[0] if params else "",
                                      detail="USER before AUTH TLS")
                    return defer.fail(
                        FTPReplyError(530, "This server requires an encrypted connection: send AUTH TLS before USER.")
                    )
                return self._call_command(cmd, params)
            if cmd == "PASS":
                return defer.fail(ftp.BadCmdSequenceError("USER required before PASS"))
            return ftp.NOT_LOGGED_IN
        if self.state == self.INAUTH:
            if cmd in ("USER", "PASS"):
                return self._call_command(cmd, params)
            return defer.fail(ftp.BadCmdSequenceError("PASS required after USER"))
        if cmd in ("USER", "PASS"):
            return defer.fail(ftp.BadCmdSequenceError("already logged in"))
        return self._call_command(cmd, params)

    def _call_command(self, cmd: str, params: tuple[str, ...]):
        method = getattr(self, "ftp_" + cmd, None) if cmd.isascii() and cmd.isalpha() else None
        if method is None:
            return defer.fail(ftp.CmdNotImplementedError(cmd[:40]))
        signature = _command_signature(method.__func__)
        try:
            signature.bind(*params)
        except TypeError:
            if params and not params[0].strip():
                params = ()  # "PASV " with a stray space
                try:
                    signature.bind()
                except TypeError:
                    return defer.fail(FTPReplyError(501, f"{cmd} requires an argument."))
            elif params:
                return defer.fail(FTPReplyError(501, f"{cmd} takes no argument."))
            else:
                return defer.fail(FTPReplyError(501, f"{cmd} requires an argument."))
        return method(*params)

    # -- login --------------------------------------------------------------------

    def ftp_USER(self, username):
        if not username:
            return defer.fail(ftp.CmdSyntaxError("USER requires an argument"))
        self._user = username
        self.state = self.INAUTH
        return Reply("331 Password required.")

    def ftp_PASS(self, password=""):
        # Bytes that were not UTF-8 stay lone surrogates: the chain refuses
        # them (invalid-username, invalid-password) and audits the attempt.
        username = self.__dict__.pop("_user", "")
        self.state = self.UNAUTH
        request, mind = self._login_request(username, password)
        started = self.factory.reactor.seconds()

        def logged_in(result):
            interface, avatar, logout = result
            if interface is not ftp.IFTPShell:
                logout()
                raise RuntimeError(f"the realm returned {interface!r} for an FTP login")
            if self._lost:
                logout(self._end_reason)  # the client left while the chain was working
                return None
            self.shell = avatar
            self._logout = logout
            self._cancel_login_deadline()
            self.workingDirectory = []
            self.state = self.AUTHED
            return ftp.USR_LOGGED_IN_PROCEED

        def failed(failure: Failure):
            self.state = self.UNAUTH
            if not failure.check(UnauthorizedLogin, UnhandledCredentials):
                _log.failure("FTP login raised an unexpected error", failure)
            return answer_failure(self.factory.reactor, started, Failure(login_failed()))

        deferred = self.portal.login(request, mind, ftp.IFTPShell)
        deferred.addCallback(logged_in)
        deferred.addErrback(failed)
        return deferred

    # -- FTPS (RFC 4217) -------------------------------------------------------------

    def _explicit_tls(self) -> bool:
        """AUTH TLS is offered on this connection (explicit FTPS service, not yet TLS)."""
        factory = self.factory
        return factory.tls is not None and not factory.settings.implicit_tls and factory.settings.ftps_explicit_enabled

    def _tls_required(self) -> bool:
        return self._explicit_tls() and self.factory.settings.ftps_force_secured_command_channel

    def _data_protection_required(self) -> bool:
        settings = self.factory.settings
        tls_offered = settings.implicit_tls or self._explicit_tls()
        return tls_offered and settings.ftps_force_secured_data_channel

    def ftp_FEAT(self):
        features = list(self.FEATURES)
        features.append("MLST " + "".join(f"{name}{'*' if name in self._mlst_facts else ''};" for name in MLST_FACTS))
        if self._explicit_tls():
            features.append("AUTH TLS")
        if self._explicit_tls() or self.tls_options is not None:
            features += ["PBSZ", "PROT"]
        self.sendLine("211-Features:")
        for feature in sorted(features):
            self.sendLine(" " + feature)
        self.sendLine("211 End")

    def ftp_AUTH(self, mechanism):
        if self.tls_options is not None:
            return defer.fail(FTPReplyError(503, "The connection is already encrypted."))
        if not self._explicit_tls():
            return defer.fail(FTPReplyError(502, "AUTH is not available on this service."))
        if mechanism.strip().upper() not in AUTH_MECHANISMS:
            return defer.fail(FTPReplyError(504, "AUTH TLS is the only security mechanism."))
        if self.state == self.AUTHED:
            return defer.fail(FTPReplyError(503, "AUTH TLS must come before USER and PASS."))
        queued = "".join(line + "\r\n" for line in self._queued).encode("utf-8", "surrogateescape")
        self._queued.clear()
        injected = queued + self.clearLineBuffer()
        if injected:
            # Commands sent in clear behind AUTH would otherwise run as if encrypted.
            _log.warn(
                "FTP service {service}: {peer} sent {count} bytes in clear after AUTH TLS; closing the connection",
                service=self.factory.settings.id,
                peer=self._peer(),
                count=len(injected),
            )
            self.sendLine("421 Data sent after AUTH TLS before its reply: closing the connection.")
            self._close_connection("protocol-error")
            return None
        self.sendLine("234 AUTH TLS successful: start the TLS handshake.")
        options = self.factory.tls.new_session()
        self.transport.startTLS(options)
        self.tls_options = options
        self.state = self.UNAUTH
        self.__dict__.pop("_user", None)
        return None

    def ftp_PBSZ(self, size):
        if self.tls_options is None:
            return defer.fail(FTPReplyError(503, "PBSZ needs an encrypted connection: send AUTH TLS first."))
        if not size.strip().isdigit():
            return defer.fail(FTPReplyError(501, "PBSZ takes a number (0 for TLS)."))
        self._pbsz = True
        return Reply("200 PBSZ=0")

    def ftp_PROT(self, level):
        if self.tls_options is None:
            return defer.fail(FTPReplyError(503, "PROT needs an encrypted connection: send AUTH TLS first."))
        if not self._pbsz:
            return defer.fail(FTPReplyError(503, "PBSZ must come before PROT."))
        level = level.strip().upper()
        if level == "C" and self.factory.settings.ftps_force_secured_data_channel:
            self._tls_refusal("tls-required", detail="PROT C")
            return defer.fail(FTPReplyError(534, "Request denied for policy reasons: data connections must be protected (PROT P)."))
        if level in ("S", "E"):
            return defer.fail(FTPReplyError(536, "Requested PROT level not supported: use P."))
        if level not in ("C", "P"):
            return defer.fail(FTPReplyError(504, "PROT takes C or P."))
        if level != self._protection:
            self._close_data_channel()  # a data connection prepared before keeps its old protection: drop it
        self._protection = level
        return Reply(f"200 Protection level set to {'Private' if level == 'P' else 'Clear'}.")

    def ftp_CCC(self):
        return defer.fail(FTPReplyError(502, "CCC is not supported: the control connection stays encrypted."))

    def _check_data_tls(self, tls_transport) -> Optional[DataChannelRefused]:
        """The reason to refuse a protected data connection whose handshake just completed, or None."""
        settings = self.factory.settings
        if not settings.ftps_require_session_reuse:
            return None
        if session_reused(tls_transport.getHandle()):
            return None
        _log.warn(
            "FTP service {service}: refused a data connection from {peer}: its TLS session is not the control connection's",
            service=settings.id,
            peer=getattr(tls_transport.getPeer(), "host", "?"),
        )
        self._tls_refusal("tls-session-not-reused", detail="a data connection")
        return DataChannelRefused(
            522, "Data connection refused: its TLS session must resume the control connection's (session reuse required)."
        )

    # -- options ------------------------------------------------------------------

    def ftp_TYPE(self, type):
        if not type.strip():
            return defer.fail(FTPReplyError(501, "TYPE requires an argument."))
        return super().ftp_TYPE("".join(type.split()))  # "A N" as Twisted expects it: "AN"

    def ftp_ALLO(self, *size):
        """Space needs no reserving here (RFC 1123 §4.1.2.10: ALLO may be a no-op); older clients send it before STOR."""
        return Reply("202 No storage allocation necessary.")

    def ftp_OPTS(self, option=""):
        words = option.upper().split()
        if words and words[0] == "UTF8" and len(words) <= 2:
            return Reply("200 Always in UTF8 mode.")
        if words and words[0] == "MLST" and len(words) <= 2:
            asked = words[1].lower().split(";") if len(words) == 2 else []
            self._mlst_facts = tuple(name for name in MLST_FACTS if name in asked)  # unknown facts are ignored
            return Reply("200 MLST OPTS " + "".join(f"{name};" for name in self._mlst_facts))
        return defer.fail(FTPReplyError(501, "Option not understood."))

    # -- data connections ---------------------------------------------------------

    def ftp_PASV(self):
        if self._epsvAll:
            return defer.fail(ftp.BadCmdSequenceError("may not send PASV after EPSV ALL"))
        local = plain_address(self.transport.getHost().host)

        def announce(address: str):
            try:
                announced = ipaddress.ip_address(plain_address(address))
            except ValueError:
                raise FTPReplyError(425, "Can't open data connection: the passive address is not an IP address.")
            if announced.version != 4:
                raise ftp.PASVIPv6NotImplementedError()
            return self._listen_passive(local).addCallback(
                lambda port: self.reply(ftp.ENTERING_PASV_MODE, ftp.encodeHostPort(str(announced), port))
            )

        return self._passive_address(local).addCallback(announce)

    def _passive_address(self, local: str) -> defer.Deferred:
        """The address PASV announces: ``passive_address`` (resolved each time) or ours."""
        configured = self.factory.settings.passive_address
        if not configured:
            return defer.succeed(local)
        try:
            ipaddress.ip_address(configured)
        except ValueError:
            pass
        else:
            return defer.succeed(configured)

        def unresolved(failure: Failure):
            _log.warn(
                "FTP service {service}: passive_address {name} does not resolve: {error}",
                service=self.factory.settings.id,
                name=configured,
                error=failure.getErrorMessage(),
            )
            raise FTPReplyError(425, "Can't open data connection.")

        return self.factory.reactor.resolve(configured).addErrback(unresolved)

    def ftp_EPSV(self, protocol=""):
        if protocol.upper() == "ALL":
            self._epsvAll = True
            return ftp.EPSV_ALL_OK
        local = plain_address(self.transport.getHost().host)
        if protocol:
            self._validateNetworkProtocol(protocol)
            family = ftp._AFNUM_IP6 if ":" in local else ftp._AFNUM_IP
            if int(protocol) != family:
                raise ftp.UnsupportedNetworkProtocolError(str(family))
        return self._listen_passive(local).addCallback(lambda port: self.reply(ftp.ENTERING_EPSV_MODE, port))

    def _new_data_factory(self) -> tuple[_DataChannelFactory, Any]:
        """The data channel factory and what to listen or connect with (TLS around it for PROT P)."""
        factory = _DataChannelFactory(pi=self, peerHost=self._peer(), reactor=self.factory.reactor)
        if self._protection == "P" and self.tls_options is not None:
            factory.protected = True
            return factory, _ProtectedDataFactory(self.tls_options, factory)
        return factory, factory

    def _check_data_protection(self) -> None:
        if self._data_protection_required() and not (self._protection == "P" and self.tls_options is not None):
            self._tls_refusal("tls-required", detail="a data connection without PROT P")
            raise FTPReplyError(521, "Data connections must be protected: send PBSZ 0 and PROT P first.")

    def _listen_passive(self, local: str) -> defer.Deferred:
        """Listen for one data connection on our address; fires with the port number.

        The session's previous passive port is closed first, and only once
        it is really closed (on a later turn of the reactor) is the new one
        opened: a client sending PASV after PASV then uses one port of
        ``passive_port_range`` at a time, not one per command (a burst of
        pipelined EPSV took the whole range).
        """
        self._check_data_protection()
        self._close_data_channel()
        closing, self._closing_port = self._closing_port, None
        if closing is None or closing.called:
            return defer.maybeDeferred(self._listen_now, local)
        closed = defer.Deferred()

        def listen(result):
            defer.maybeDeferred(self._listen_now, local).chainDeferred(closed)
            return result  # the port's own Deferred keeps its result

        closing.addBoth(listen)
        return closed

    def _listen_now(self, local: str) -> int:
        if self._lost:
            raise FTPReplyError(425, "Can't open data connection: the session has ended.")
        factory, wire = self._new_data_factory()
        try:
            port = self.getDTPPort(wire, interface=local)
        except internet_error.CannotListenError:
            _log.warn(
                "FTP service {service}: no free passive port in {ports}",
                service=self.factory.settings.id,
                ports=self.factory.settings.passive_port_range,
            )
            raise FTPReplyError(425, "Can't open data connection: no passive port is free.")
        factory.setTimeout(self.dtpTimeout)
        self.dtpFactory = factory
        self.dtpPort = port

        def not_connected(failure: Failure) -> None:
            # The client never came within dtpTimeout: close the port quietly; the
            # transfer command, if one is waiting, answers 425 (_with_data_channel).
            if not failure.check(ftp.PortConnectionError):
                _log.failure("FTP passive data connection", failure)
            if self.dtpFactory is factory:
                self._close_data_channel()

        factory.deferred.addErrback(not_connected)
        return port.getHost().port

    def ftp_PORT(self, address):
        if self._epsvAll:
            return defer.fail(ftp.BadCmdSequenceError("may not send PORT after EPSV ALL"))
        try:
            numbers = [int(part) for part in address.split(",")]
        except ValueError:
            numbers = []
        if len(numbers) != 6 or not all(0 <= number <= 255 for number in numbers):
            return defer.fail(ftp.CmdArgSyntaxError(address[:64]))
        host = ".".join(str(number) for number in numbers[:4])
        return self._connect_active(host, numbers[4] << 8 | numbers[5])

    def ftp_EPRT(self, extendedAddress):
        if self._epsvAll:
            return defer.fail(ftp.BadCmdSequenceError("may not send EPRT after EPSV ALL"))
        try:
            protocol, host, port = ftp.decodeExtendedAddress(extendedAddress)
            family = ftp._AFNUM_IP6 if ipaddress.ip_address(host).version == 6 else ftp._AFNUM_IP
            if not 0 < port < 65536:
                raise ValueError(port)
        except (ValueError, IndexError):
            return defer.fail(ftp.CmdArgSyntaxError(extendedAddress[:64]))
        if protocol:
            self._validateNetworkProtocol(protocol)
            if int(protocol) != family:  # RFC 2428: net-prt 1 is an IPv4 address, 2 an IPv6 one
                return defer.fail(FTPReplyError(501, f"Network protocol {protocol} does not match the address {host}."))
        return self._connect_active(host, port)

    def _connect_active(self, host: str, port: int):
        if plain_address(host) != self._peer() or port < 1024:
            return defer.fail(FTPReplyError(501, "Data connections go only to your own address, on a port above 1023."))
        try:
            self._check_data_protection()
        except FTPReplyError as refusal:
            return defer.fail(refusal)
        self._close_data_channel()
        factory, wire = self._new_data_factory()
        factory.setTimeout(self.dtpTimeout)
        self.dtpFactory = factory
        self.dtpPort = self.factory.reactor.connectTCP(plain_address(host), port, wire)

        def failed(failure: Failure):
            failure.trap(ftp.PortConnectionError)
            self._close_data_channel()
            return ftp.CANT_OPEN_DATA_CNX

        return factory.deferred.addCallbacks(lambda ignored: ftp.ENTERING_PORT_MODE, failed)

    def _with_data_channel(self, transfer: Callable[[Any], Any]) -> defer.Deferred:
        """``transfer(dtp)`` on the connected data channel, or 425.

        After PASV/EPSV the client may send other commands before it connects
        (those are answered at once); the transfer command waits for the
        connection, up to the data timeout.
        """
        dtp = self.dtpInstance
        if dtp is not None and dtp.isConnected:
            return defer.maybeDeferred(transfer, dtp)
        factory = self.dtpFactory
        if factory is None or factory.deferred.called:
            return defer.fail(FTPReplyError(425, "Use PORT, EPRT, PASV or EPSV first."))
        connected = defer.Deferred()
        factory.deferred.addBoth(lambda ignored: connected.callback(None))

        def ready(ignored):
            dtp = self.dtpInstance
            if dtp is None or not dtp.isConnected:
                raise FTPReplyError(425, "Can't open data connection.")
            return transfer(dtp)

        return connected.addCallback(ready)

    def _close_data_channel(self) -> None:
        """Forget the data channel; close its listening port; let sent data flush."""
        dtp = self.dtpInstance
        if dtp is not None and dtp.isConnected and dtp.transport is not None:
            dtp.transport.loseConnection()
        self.cleanupDTP()

    def cleanupDTP(self) -> None:
        """Twisted's, without its log lines and its assertion on a missing port."""
        port, self.dtpPort = self.dtpPort, None
        if interfaces.IListeningPort.providedBy(port):
            self._closing_port = port.stopListening()  # a Deferred (or None): the next PASV waits for it
        elif interfaces.IConnector.providedBy(port):
            port.disconnect()
        factory, self.dtpFactory = self.dtpFactory, None
        if factory is not None:
            factory.stopFactory()
        self.dtpInstance = None

    def _abort_data_connection(self) -> None:
        dtp = self.dtpInstance
        if dtp is not None and dtp.isConnected and dtp.transport is not None:
            dtp.aborted = True
            dtp.transport.abortConnection()

    def _abort_transfer(self) -> None:
        """ABOR during a transfer: cut the data connection (the transfer answers 426), or stop waiting for it (425)."""
        self._abort_data_connection()
        factory = self.dtpFactory
        if factory is not None:
            factory.give_up()

    def _when_secured(self, result, dtp):
        """Answer 150, then wait until the data connection may carry data (its TLS handshake passed); ``result``."""
        self.reply(ftp.DATA_CNX_ALREADY_OPEN_START_XFR)
        return dtp.when_secured().addCallback(lambda ignored: result)

    def _transfer_done(self, result):
        self._close_data_channel()
        return result

    def _transfer_failed(self, failure: Failure):
        if failure.check(ftp.FTPCmdError):
            return failure
        if not failure.check(internet_error.ConnectionLost, internet_error.ConnectionDone):
            _log.failure("FTP transfer failed", failure)
        return ftp.CNX_CLOSED_TXFR_ABORTED

    def ftp_ABOR(self):
        self._close_data_channel()
        return (ftp.CLOSING_DATA_CNX,)

    # -- paths --------------------------------------------------------------------

    def _segments(self, path: str) -> list[str]:
        """Segments of ``path`` from the working folder; ``..`` stops at ``/``."""
        segments = [] if path.startswith("/") else list(self.workingDirectory)
        for segment in path.split("/"):
            if segment in ("", "."):
                continue
            if segment == "..":
                if segments:
                    segments.pop()
                continue
            segments.append(segment)
        return segments

    @staticmethod
    def _quoted(segments: Sequence[str]) -> str:
        return ("/" + "/".join(segments)).replace('"', '""')

    def ftp_PWD(self):
        return Reply(f'257 "{self._quoted(self.workingDirectory)}" is the current folder.')

    def ftp_CWD(self, path):
        segments = self._segments(path)

        def changed(ignored):
            self.workingDirectory = segments
            return (ftp.REQ_FILE_ACTN_COMPLETED_OK,)

        return self.shell.access(segments).addCallback(changed)

    def ftp_CDUP(self):
        return self.ftp_CWD("..")

    def ftp_MKD(self, path):
        segments = self._segments(path)
        return self.shell.makeDirectory(segments).addCallback(
            lambda ignored: Reply(f'257 "{self._quoted(segments)}" created.')
        )

    def ftp_RMD(self, path):
        return self.shell.removeDirectory(self._segments(path)).addCallback(
            lambda ignored: (ftp.REQ_FILE_ACTN_COMPLETED_OK,)
        )

    # RFC 775's names, which RFC 1123 4.1.3.1 says to accept: Windows ftp.exe sends them.
    ftp_XPWD = ftp_PWD
    ftp_XCWD = ftp_CWD
    ftp_XCUP = ftp_CDUP
    ftp_XMKD = ftp_MKD
    ftp_XRMD = ftp_RMD

    def ftp_DELE(self, path):
        return self.shell.removeFile(self._segments(path)).addCallback(
            lambda ignored: (ftp.REQ_FILE_ACTN_COMPLETED_OK,)
        )

    def ftp_RNFR(self, fromName):
        """350 only for a name that exists (and may be renamed), else 550, as ProFTPD and vsftpd answer.

        Twisted answered 350 to any name and the error came only after RNTO.
        """

        def pending(ignored):
            self._fromName = fromName
            self.state = self.RENAMING
            return (ftp.REQ_FILE_ACTN_PENDING_FURTHER_INFO,)

        return self.shell.checkRenameSource(self._segments(fromName)).addCallback(pending)

    def ftp_RNTO(self, toName):
        fromName = self.__dict__.pop("_fromName", None)
        self.state = self.AUTHED
        if fromName is None:
            return defer.fail(ftp.BadCmdSequenceError("RNFR required before RNTO"))
        return self.shell.rename(self._segments(fromName), self._segments(toName)).addCallback(
            lambda ignored: (ftp.REQ_FILE_ACTN_COMPLETED_OK,)
        )

    def ftp_SIZE(self, path):
        segments = self._segments(path)

        def answer(values):
            size, directory = values
            if directory:
                raise FTPReplyError(550, f"/{'/'.join(segments)}: not a plain file.")
            return (ftp.FILE_STATUS, str(size))

        return self.shell.stat(segments, ("size", "directory")).addCallback(answer)

    def ftp_MDTM(self, path):
        def answer(values):
            (modified,) = values
            return (ftp.FILE_STATUS, time.strftime("%Y%m%d%H%M%S", time.gmtime(modified)))

        return self.shell.stat(self._segments(path), ("modified",)).addCallback(answer)

    def ftp_MFMT(self, arguments):
        """Set a file's modification time (draft-somers-ftp-mfxx): ``MFMT YYYYMMDDHHMMSS path``."""
        stamp, _, path = arguments.partition(" ")
        try:
            modified = calendar.timegm(time.strptime(stamp[:14], "%Y%m%d%H%M%S"))
        except ValueError:
            return defer.fail(FTPReplyError(501, "MFMT needs YYYYMMDDHHMMSS and a file name."))
        if not path:
            return defer.fail(FTPReplyError(501, "MFMT needs YYYYMMDDHHMMSS and a file name."))
        # The time stored, which the filesystem may have clamped (draft-somers-ftp-mfxx 3.3: the value set).
        return self.shell.setModificationTime(self._segments(path), modified).addCallback(
            lambda stored: Reply(f"213 Modify={time.strftime('%Y%m%d%H%M%S', time.gmtime(stored))}; {path}")
        )

    # -- listings -----------------------------------------------------------------

    def _listing_target(self, path: str) -> tuple[list[str], Optional[str]]:
        """The folder to list and a glob for the names, from ``dir/*.txt``.

        Only a last name the client typed with ``*``, ``?`` or ``[`` is a
        glob (Twisted's test also takes names with ``-`` or ``.`` for globs,
        and the working folder's last name too).
        """
        path = _strip_list_options(path)
        folder, slash, last = path.rpartition("/")
        if any(char in last for char in "*?["):
            return self._segments(folder or slash), last
        return self._segments(path), None

    def _send_listing(
        self, folder: list[str], lines: Callable[[], _LineFormat], glob: Optional[str] = None, folder_only: bool = False
    ):
        """Send a folder's listing through the data connection; ``lines()`` gives the line format."""

        def transfer(dtp):
            listing = self.shell.listing(folder, lines(), glob, folder_only)
            return listing.addCallback(self._send_download, dtp)

        return self._with_data_channel(transfer).addBoth(self._transfer_done)

    def _list_lines(self) -> _LineFormat:
        """The ``ls -l`` line format of LIST (and STAT with a path)."""
        owner, group, this_year = self.shell.owner, self.shell.group, time.gmtime().tm_year
        return lambda entry: list_line(entry.name, entry.result, owner, group, this_year, entry.link)

    def ftp_LIST(self, path=""):
        folder, glob = self._listing_target(path)
        return self._send_listing(folder, self._list_lines, glob)

    def ftp_NLST(self, path=""):
        folder, glob = self._listing_target(path)
        # A glob expands to paths, as a shell's does: "NLST d1/*" gives "d1/a", which RETR takes as it is
        # (mget of Windows ftp.exe, scripts). A folder listed without a glob gives bare names.
        head, slash, _ = _strip_list_options(path).rpartition("/")
        prefix = head + slash if glob else ""
        return self._send_listing(folder, lambda: lambda entry: listing_name(prefix + entry.name), glob)

    def ftp_MLSD(self, path=""):
        def lines() -> _LineFormat:
            permissions, facts = self.shell.filesystem.permissions, self._mlst_facts
            return lambda entry: (
                mlsx_facts(entry.result, permissions, facts, link=entry.link).encode("utf-8", "surrogateescape")
                + b" " + listing_name(entry.name)
            )

        return self._send_listing(self._segments(path), lines, folder_only=True)  # a file: 501, as pyftpdlib answers

    def ftp_MLST(self, path=""):
        segments = self._segments(path)

        def answer(facts: str):
            shown = listing_name(virtual_name(segments))  # the name's bytes, as MLSD sends them
            self.sendLine(b"250-Listing " + shown)
            self.sendLine(f" {facts} ".encode("ascii") + shown)
            return Reply("250 End")

        return self.shell.facts(segments, self._mlst_facts).addCallback(answer)

    # -- status and help ----------------------------------------------------------

    def ftp_STAT(self, path=""):
        """RFC 959 STAT: the session's status, or with a path its LIST lines on the control connection (213).

        Every line of a listing starts with a space, so none can be taken
        for the reply's last line. Answered after a running transfer, as
        every command but ABOR is. The lines go out a chunk at a time, as
        the control connection takes them (as LIST's on a data connection):
        a big folder is never held whole in memory.
        """
        if not path.strip():
            return self._status()
        folder, glob = self._listing_target(path)

        def stream(download: FileDownload) -> defer.Deferred:
            if self.transport is None:  # the client left while the folder was opened
                return download.discard().addCallback(lambda ignored: _raise(internet_error.ConnectionLost()))
            self.sendLine(f"213-Status of {virtual_name(folder)}:")  # a name the listing took is valid
            # Each chunk the client takes keeps the session alive; one that stops reading is idle.
            return download.send(_ProgressConsumer(_IndentedLines(self.transport), self.resetTimeout))

        def cut_short(failure: Failure):
            if failure.check(internet_error.ConnectionLost, internet_error.ConnectionDone):
                return None  # the client left during the listing: nobody to answer
            # The reply has begun: it can only end with 213 (RFC 959 4.2).
            _log.failure("STAT {folder}: the listing stopped", failure, folder=virtual_name(folder))
            return Reply("213 End of status (the listing is incomplete: local error in processing).")

        listing = self.shell.listing(folder, self._list_lines(), glob)
        return listing.addCallback(
            lambda download: stream(download).addCallbacks(lambda ignored: Reply("213 End of status."), cut_short)
        )

    def _status(self) -> Reply:
        settings = self.factory.settings
        protected = "TLS" if self.tls_options is not None else "not encrypted"
        data = "TLS (PROT P)" if self._protection == "P" else "not encrypted (PROT C)"
        lines = [
            f"211-{settings.name or 'sftpauth'} FTP status (service {settings.id}):",
            f" Connected from {self._peer()}",
            f" Logged in as {self.shell.owner}",
            f" TYPE: {'BINARY (I)' if self.binary else 'ASCII (A)'}; STRUcture: File; MODE: Stream",
            f" Control connection: {protected}; data connections: {data}",
            f" Working folder: {virtual_name(self.workingDirectory)}",
        ]
        for line in lines:
            self.sendLine(line)
        return Reply("211 End of status.")

    def ftp_HELP(self, command=""):
        """The commands this server answers (214); also before login, as vsftpd and ProFTPD answer."""
        if command.strip():
            name = command.strip().upper()
            if name.isascii() and name.isalpha() and hasattr(self, "ftp_" + name):
                return Reply(f"214 {name} is supported; see RFC 959, 2228, 2389, 2428 or 3659.")
            return defer.fail(FTPReplyError(502, f"Unknown command {name[:40]}."))
        names = sorted(name[4:] for name in dir(self) if name.startswith("ftp_") and name[4:].isupper())
        self.sendLine("214-The following commands are recognized:")
        for start in range(0, len(names), 8):
            self.sendLine(" " + " ".join(f"{name:<5}" for name in names[start : start + 8]).rstrip())
        return Reply("214 Help OK.")

    # -- transfers ----------------------------------------------------------------

    def ftp_REST(self, marker):
        marker = marker.strip()
        if not (marker.isascii() and marker.isdigit()) or len(marker) > 19:
            self._restart = 0
            return defer.fail(FTPReplyError(501, "REST takes a byte offset (a whole number)."))
        self._restart = int(marker)
        return Reply(f"350 Restarting at {self._restart}. Send RETR or STOR to resume the transfer.")

    def ftp_RETR(self, path):
        offset, self._restart = self._restart, 0

        def transfer(dtp):
            return self.shell.openForReading(self._segments(path), offset).addCallback(self._send_download, dtp)

        return self._with_data_channel(transfer).addBoth(self._transfer_done)

    def _send_download(self, download: "FileDownload", dtp) -> defer.Deferred:
        """Answer 150 and send a file (or a listing) once the data connection may carry it."""

        def send(ignored):
            sending = download.send(_ProgressConsumer(dtp, self.resetTimeout))
            return sending.addCallbacks(lambda ignored: (ftp.TXFR_COMPLETE_OK,), self._transfer_failed)

        def refused(failure: Failure):
            return download.discard().addBoth(lambda ignored: failure)

        return self._when_secured(download, dtp).addCallbacks(send, refused)

    def ftp_STOR(self, path):
        offset, self._restart = self._restart, 0
        return self._receive(path, append=False, offset=offset)

    def ftp_APPE(self, path):
        return self._receive(path, append=True)

    def _receive(self, path: str, append: bool, offset: int = 0):
        def transfer(dtp):
            def opened(file):
                def start(consumer):
                    def secured(consumer):
                        consumer.begin()
                        return dtp.registerConsumer(_ProgressConsumer(consumer, self.resetTimeout))

                    return self._when_secured(consumer, dtp).addCallback(secured)

                def close(result):
                    closing = file.close(failed=isinstance(result, Failure))
                    if isinstance(result, Failure) and not file.write_failed:
                        # The first error is the one to report. A failed write (a full disk) is reported
                        # by close(): it stopped the data connection, which may end ``result`` (under TLS).
                        closing.addBoth(lambda ignored: result)
                    return closing

                receiving = file.receive().addCallback(start).addBoth(close)
                return receiving.addCallbacks(lambda ignored: (ftp.TXFR_COMPLETE_OK,), self._transfer_failed)

            opening = self.shell.openForWriting(self._segments(path), append=append, offset=offset)
            return opening.addCallback(opened)

        return self._with_data_channel(transfer).addBoth(self._transfer_done)


class FTPServiceFactory(ftp.FTPFactory):
    """Builds :class:`SftpauthFTP` connections for one ``[services/ID] type = ftp`` or ``ftpsi``."""

    protocol = SftpauthFTP
    allowAnonymous = False
    noisy = False

    def __init__(self, settings: FTPServiceSettings, runtime: Runtime, tls: Optional[ServerTLS] = None):
        super().__init__(portal=runtime.portal)
        self.settings = settings
        self.reactor = runtime.reactor
        self.tls = tls
        self.policy = runtime.policy_for(settings)  # audits the refusals of the TLS policy
        self.welcomeMessage = settings.banner
        self.timeOut = settings.idle_connection_timeout or None
        if settings.passive_port_range:
            first, last = settings.passive_port_range
            self.passivePortRange = range(first, last + 1)
        else:
            self.passivePortRange = range(0, 1)  # any free port

    def buildProtocol(self, addr):
        # The connection limit is listening.py's job: no extra wrapper here.
        protocol = self.protocol()
        protocol.factory = self
        protocol.portal = self.portal
        protocol.timeOut = self.timeOut
        protocol.passivePortRange = self.passivePortRange
        protocol.listenFactory = self._listen_passive_port
        protocol.callLater = self.reactor.callLater
        return protocol

    def _listen_passive_port(self, port: int, factory, interface: str = ""):
        """``reactor.listenTCP`` for a passive data port, without its log lines (:class:`_QuietPort`)."""
        if not isinstance(self.reactor, PosixReactorBase):  # a test's memory reactor: nothing is logged there
            return self.reactor.listenTCP(port, factory, interface=interface)
        listening = _QuietPort(port, factory, interface=interface, reactor=self.reactor)
        listening.startListening()
        return listening


def load_tls(settings: FTPServiceSettings, config_path: str) -> Optional[ServerTLS]:
    """The service's certificate, or None for plain FTP; ConfigError when it cannot be used."""
    section = f"services/{settings.id}"

    def problem(option: str, message: str) -> ConfigError:
        return ConfigError([ConfigProblem(config_path, None, section, option, message)])

    if not settings.ssl_certificate:
        if settings.implicit_tls:
            raise problem("ssl_certificate", "required for type = ftpsi (implicit FTPS): a PEM file with the certificate and its key")
        return None
    try:
        tls = ServerTLS(settings.ssl_certificate, settings.id, maximum_version=FTPS_MAXIMUM_VERSION)
    except CertificateProblem as error:
        raise problem("ssl_certificate", str(error)) from None
    if settings.ftps_require_session_reuse and not can_check_session_reuse():  # pragma: no cover - other pyOpenSSL
        raise problem(
            "ftps_require_session_reuse",
            "this pyOpenSSL cannot tell whether a TLS session was resumed; set ftps_require_session_reuse = no",
        )
    return tls


def service_tls(settings: FTPServiceSettings, config_path: str) -> Optional[ServerTLS]:
    """The certificate the service serves FTPS with, None for plain FTP; ConfigError when it cannot be used."""
    tls = load_tls(settings, config_path)
    if tls is not None and not settings.implicit_tls and not settings.ftps_explicit_enabled:
        return None  # plain FTP: a configuration warning says so (config.loader._check_ftps_options)
    return tls


def make_service(settings: FTPServiceSettings, runtime: Runtime) -> IService:
    """The listening service of one ``type = ftp`` or ``type = ftpsi`` section.

    In a worker process the certificate comes from the parent (``runtime.tls``),
    which reloads it on SIGHUP, checks its dates and gives the workers the new
    one (:mod:`sftpauth.workers.pool`); otherwise the service does both itself.
    """
    given = runtime.tls.get(settings.id)
    tls = given if given is not None else service_tls(settings, runtime.configuration.path)
    factory = FTPServiceFactory(settings, runtime, tls)
    if tls is None:
        return listening_service(runtime.reactor, settings, factory, runtime.policy_for(settings))
    if settings.implicit_tls:
        wire = TLSMemoryBIOFactory(_ImplicitTLS(tls), False, factory)
        wire.noisy = False
        mode = "implicit FTPS (TLS from the first byte)"
    else:
        wire = factory
        mode = "explicit FTPS (AUTH TLS)"
    _log.info(
        "service {service}: {mode}; control channel {control}, data channels {data}, TLS session reuse {reuse}",
        service=settings.id,
        mode=mode,
        control="TLS required" if settings.implicit_tls or settings.ftps_force_secured_command_channel else "TLS optional",
        data="TLS required" if settings.ftps_force_secured_data_channel else "TLS optional",
        reuse="required" if settings.ftps_require_session_reuse else "not checked",
    )
    tls.log_certificate()
    service = MultiService()
    service.setName(settings.id)
    listening_service(runtime.reactor, settings, wire, runtime.policy_for(settings)).setServiceParent(service)
    if given is None:
        ReloadOnSIGHUP(runtime.reactor, tls.reload).setServiceParent(service)
        DailyDateCheck(runtime.reactor, tls.check_dates).setServiceParent(service)
    return service
