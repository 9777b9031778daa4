"""The jail: every client path of FTP and SFTP goes through :func:`resolve` (or :func:`resolve_entry`).

A session sees its home folder as ``/``. ``..`` stops at ``/``, absolute
names are taken inside the home folder, and the real path (symlinks
followed) must still be inside it, so a symlink planted in a home folder
cannot reach ``/etc``. Names with NUL bytes, over-long names and
undecodable bytes are refused.

The real path is then used without following any link (:func:`_beneath`):
each folder of it is opened from the one above with ``O_NOFOLLOW``, and the
operation acts on a name relative to the last one. A folder swapped for a
link between the check and the use (by someone with a shell on the
machine) makes the operation fail instead of leading outside.

:class:`JailedFilesystem` is the only place that touches files for a
session: it resolves the path, checks the primary group's permission, and
does the I/O in a thread so the reactor never waits on a disk.
"""

from __future__ import annotations

import errno
import fcntl
import os
import posixpath
import re
import stat as stat_module
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

from twisted.internet import defer
from twisted.logger import Logger

from sftpauth.permissions import Permission, PermissionDenied

_log = Logger()

MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 4096


class InvalidPath(Exception):
    """A client path that can never be valid (NUL, too long, surrogates that are no byte's escape)."""


class InvalidName(InvalidPath):
    """A name that may exist on disk but must not be created (control characters, not UTF-8)."""


class OffsetPastEnd(ValueError):
    """A restart offset (FTP ``REST``) beyond the end of the file."""

    def __init__(self, offset: int, size: int):
        self.offset, self.size = offset, size
        super().__init__(f"the offset {offset} is past the end of the file ({size} bytes)")


class OutsideJail(Exception):
    """A path whose real location is outside the home folder."""

    def __init__(self, virtual_path: str):
        self.virtual_path = virtual_path
        super().__init__(f"{virtual_path}: no such file or folder")


NOT_UTF8 = re.compile("[\udc80-\udcff]")  # surrogate escapes: bytes that were not UTF-8
NOT_A_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # other surrogates: no name on disk has them


def disk_bytes(name: str) -> bytes:
    """The bytes of a name on disk (surrogate escapes back to the bytes they stand for)."""
    return name.encode("utf-8", "surrogateescape")


def virtual_path(client_path: Union[str, bytes], cwd: str = "/") -> str:
    """Normalise a client path to an absolute path inside the session's ``/``.

    Bytes that are not UTF-8 become surrogate escapes, as ``os.scandir``
    gives the names on disk that are not UTF-8: a name the listing showed
    names the same file when it comes back. New names must be UTF-8
    (:func:`check_new_name`).
    """
    if isinstance(client_path, bytes):
        client_path = client_path.decode("utf-8", "surrogateescape")
    if "\0" in client_path:
        raise InvalidPath("the path contains a NUL byte")
    if NOT_A_BYTE.search(client_path):
        raise InvalidPath("the path is not valid UTF-8")
    encoded_length = len(disk_bytes(client_path))
    if encoded_length > MAX_PATH_BYTES:
        raise InvalidPath(f"the path is longer than {MAX_PATH_BYTES} bytes")
    client_path = client_path.replace("\\", "/") if os.sep == "\\" else client_path
    joined = posixpath.normpath(posixpath.join(cwd, client_path))
    # normpath keeps a leading "//" and never climbs above "/"
    joined = "/" + joined.lstrip("/")
    for segment in joined.split("/"):
        if len(disk_bytes(segment)) > MAX_SEGMENT_BYTES:
            raise InvalidPath(f"a name is longer than {MAX_SEGMENT_BYTES} bytes")
    return joined


CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL: never in new names, "?" in FTP listings
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")  # ls -l, in any locale


def _control_character_name(char: str) -> str:
    if char in "\r\n":
        return "a line break"
    return f"a control character (U+{ord(char):04X})"


def check_new_name(path: str) -> None:
    """Refuse to create a name (the last segment of ``path``) with a C0 control character or DEL, or not UTF-8.

    Such names forge lines in FTP listings and put escape sequences on
    other users' terminals, or show as garbage to every other client.
    Existing names are not checked: files put there by other means stay
    listable, readable, deletable and can be renamed to a good name.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if NOT_UTF8.search(name):
        raise InvalidName("the name is not valid UTF-8")
    found = CONTROL_CHARACTERS.search(name)
    if found:
        raise InvalidName(f"the name contains {_control_character_name(found.group())}")


def names_a_folder(client_path: Union[str, bytes]) -> bool:
    """Whether the path as the client wrote it can only name a folder: it ends with ``/``, ``/.`` or ``/..``.

    :func:`virtual_path` drops that ending, so ``file.txt/`` would name the
    file; the kernel refuses such a path for a file (ENOTDIR), and so do we
    (:meth:`JailedFilesystem._call`). An empty path is the current folder.
    """
    if isinstance(client_path, bytes):
        client_path = client_path.decode("utf-8", "surrogateescape")
    return posixpath.basename(client_path) in ("", ".", "..")


def _require_folder(root: str, virtual: str, entry: bool, creates_file: bool) -> None:
    """For a path written as a folder's (:func:`names_a_folder`): a file, or a link itself, is not one.

    Nothing there is left to the operation (a new folder, or not found),
    except a new file, which cannot have such a name. ``entry``: the
    operation acts on a link itself (removing, renaming), and ``link/``
    names what it points to, so it is refused, as rmdir/unlink refuse it.
    """
    try:
        if entry and virtual != "/" and os.path.islink(resolve_entry(root, virtual)):
            raise NotADirectoryError(errno.ENOTDIR, "a link, named as a folder", virtual)
        mode = _lstat_beneath(root, resolve(root, virtual)).st_mode
    except FileNotFoundError:
        if creates_file:
            raise InvalidName("a file name cannot end with /") from None
        return
    if not stat_module.S_ISDIR(mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", virtual)


def resolve(root: str, client_path: Union[str, bytes], cwd: str = "/") -> str:
    """The real filesystem path of ``client_path``; never outside ``root``.

    ``root`` must already be a real path (see :class:`JailedFilesystem`).
    """
    virtual = virtual_path(client_path, cwd)
    real = _real_below(root, virtual)
    if not _within(root, real):
        raise OutsideJail(virtual)
    return real


def _real_below(root: str, virtual: str) -> str:
    """``os.path.realpath(root + virtual)``, without examining ``root``'s own folders again.

    ``root`` is a real path already (no link in it), so the walk starts
    there: a path with no link costs one ``lstat`` per name below the home
    folder, not one per name from ``/`` (every FTP and SFTP command resolves
    its path, in a thread, where each system call lets the reactor's thread
    take the GIL back). A name that cannot be examined (a new file's, a
    missing folder's) is kept as written, as ``realpath`` keeps it. From the
    first link on, ``os.path.realpath`` resolves the whole path as before:
    what a link points to, inside or outside, is never worked out here.
    """
    path = root
    for name in virtual.split("/"):
        if not name:
            continue
        candidate = os.path.join(path, name)
        try:
            if stat_module.S_ISLNK(os.lstat(candidate).st_mode):
                return os.path.realpath(os.path.join(root, virtual.lstrip("/")))
        except OSError:
            pass  # as realpath: not a link, kept as written
        path = candidate
    return path


def resolve_entry(root: str, client_path: Union[str, bytes], cwd: str = "/") -> str:
    """The real path of the entry ``client_path`` names, itself: a symlink, not what it points to.

    Its folder is resolved as :func:`resolve` does (symlinks followed, never
    outside ``root``); its last name is kept. Removing or renaming a link
    then acts on the link, as ``unlink`` and ``rename`` do (and OpenSSH's
    sftp-server): deleting a link to a shared file must not delete the file.
    A link that leads outside stays what the jail makes it everywhere else,
    unusable (OutsideJail); one that leads nowhere can go. ``/`` is ``root``.
    """
    virtual = virtual_path(client_path, cwd)
    folder, name = posixpath.split(virtual)
    if not name:
        return root
    entry = os.path.join(resolve(root, folder), name)
    if os.path.islink(entry) and not is_inside(root, entry):
        raise OutsideJail(virtual)
    return entry


# A folder opened only to be walked through or used as the ``dir_fd`` of the next call: O_PATH needs
# no read permission on it (as walking a path does not), where the system has it.
_WALK_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC  # open() flags that need allow-write
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a folder to list


@contextmanager
def _beneath(root: str, real: str) -> Iterator[tuple[int, str]]:
    """``(folder, name)``: the folder holding ``real``, open, and ``real``'s last name in it.

    ``real`` is what :func:`resolve` or :func:`resolve_entry` returned:
    inside ``root``, and when it was checked none of its folders was a
    link. Each folder is opened from the one above it with ``O_NOFOLLOW``,
    so one that has become a link since fails (ELOOP, ENOTDIR) instead of
    being followed. The caller acts on ``name`` relative to ``folder``
    (``dir_fd=``, ``follow_symlinks=False``). ``root`` itself, the home
    folder's real path, is trusted; for ``real == root`` the name is ``.``.
    """
    relative = os.path.relpath(real, root)
    names = [] if relative == os.curdir else relative.split(os.sep)
    if os.pardir in names:
        raise OutsideJail(real)  # never: resolve() returns paths inside root
    folder = os.open(root, _WALK_FLAGS)
    try:
        for name in names[:-1]:
            inner = os.open(name, _WALK_FLAGS, dir_fd=folder)
            os.close(folder)
            folder = inner
        yield folder, names[-1] if names else os.curdir
    finally:
        os.close(folder)


def _open_beneath(root: str, real: str, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of ``real`` inside ``root`` without following any link (:func:`_beneath`); a descriptor."""
    with _beneath(root, real) as (folder, name):
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder)


def _lstat_beneath(root: str, real: str) -> os.stat_result:
    """``os.lstat`` of ``real`` inside ``root`` without following any link of its folders."""
    with _beneath(root, real) as (folder, name):
        return os.stat(name, dir_fd=folder, follow_symlinks=False)


def _exists_beneath(root: str, real: str) -> bool:
    try:
        _lstat_beneath(root, real)
    except FileNotFoundError:
        return False
    return True


def _open_file_descriptor(root: str, real: str, flags: int, mode: int = 0o666, shown: str = "") -> int:
    """:func:`_open_beneath` of a file: a folder is IsADirectoryError naming ``shown`` (default ``real``).

    Opening a folder for writing fails in the kernel; for reading it works,
    and is refused here.
    """
    try:
        descriptor = _open_beneath(root, real, flags, mode)
    except IsADirectoryError:
        raise IsADirectoryError(errno.EISDIR, "is a folder", shown or real) from None
    if stat_module.S_ISDIR(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise IsADirectoryError(errno.EISDIR, "is a folder", shown or real)
    return descriptor


def _open_file_beneath(root: str, real: str, flags: int, file_mode: str):
    """A Python file object of ``real`` (see :func:`_open_file_descriptor`)."""
    return os.fdopen(_open_file_descriptor(root, real, flags), file_mode)


def _lock_upload(file) -> None:
    """Hold an exclusive ``flock`` on a file being uploaded until it is closed; BlockingIOError if another has it.

    Two uploads into one file at once would interleave their bytes and both
    be told they succeeded (vsftpd's ``lock_upload_files`` prevents the
    same). The lock is taken before the file is emptied, so a refused upload
    changes nothing; ``flock`` works across processes, so across workers.
    """
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise BlockingIOError(errno.EWOULDBLOCK, "another session is uploading this file") from None


class PreparedUpload:
    """A file opened and locked for an FTP upload (STOR, APPE, REST + STOR), not yet changed.

    The data connection may still be refused once the file is open (its TLS
    handshake, the TLS session-reuse check): until :meth:`begin`, the file is
    as it was. :meth:`begin` empties it, or cuts it at the resumed offset;
    an upload that never begins is given up by
    :meth:`JailedFilesystem.abandon_upload`, which removes the file only if
    opening it created it.
    """

    def __init__(self, file, real: str, cut: bool, created: bool):
        self.file = file
        self.real = real
        self.created = created
        self._cut_due = cut

    def begin(self) -> None:
        """Empty the file, or cut it at the resumed offset (its position), once (blocking: in a thread)."""
        if self._cut_due:
            self._cut_due = False
            self.file.truncate()


def refuse_home_folder(root: str, real: str, change: str) -> None:
    """PermissionError when ``real`` is the home folder itself, which can be neither removed nor renamed."""
    if real == root:
        raise PermissionError(errno.EACCES, f"the home folder cannot be {change}", "/")


def _sorted_names(folder: int) -> Iterator[str]:
    """The names in an open folder, sorted (read whole, then the descriptor's scandir is closed)."""
    with os.scandir(folder) as iterator:
        return iter(sorted(entry.name for entry in iterator))


def _seek(file, offset: int) -> None:
    """Position an open file at ``offset``, which may be its end but not past it (closed then)."""
    size = os.fstat(file.fileno()).st_size
    if offset > size:
        file.close()
        raise OffsetPastEnd(offset, size)
    file.seek(offset)


def printable(text: str, limit: Optional[int] = 1024) -> str:
    """A client-chosen name made safe for a log line or a terminal (no newlines or escapes).

    A byte that is not UTF-8 is shown as ``\\xff``; text past ``limit``
    characters (None: no limit) is left out.
    """
    return "".join(_printable_character(char) for char in text[:limit])


def _printable_character(char: str) -> str:
    if char.isprintable():
        return char
    if "\udc80" <= char <= "\udcff":  # a surrogate escape: the byte it stands for
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]


def _shown_path(client_path: Union[str, bytes], cwd: str) -> str:
    """A client path as a log line shows it: the session's absolute path, or what was sent when it is no path."""
    try:
        return printable(virtual_path(client_path, cwd))
    except InvalidPath:
        sent = client_path.decode("utf-8", "backslashreplace") if isinstance(client_path, bytes) else client_path
        return printable(sent)


def describe_failure(error: BaseException) -> str:
    """What went wrong with a file operation, in words for a client or a log line.

    Never a path on the server (``str(OSError)`` holds one). Our own
    OSErrors say what happened in their ``strerror`` (``a folder cannot be
    moved into itself``); the kernel's say what ``strerror(3)`` says.
    """
    if isinstance(error, (OutsideJail, FileNotFoundError)):
        return "no such file or folder"
    if isinstance(error, PermissionDenied):
        return f"permission denied: {error.permission.value} is not granted"
    if isinstance(error, InvalidName):
        return f"file name not allowed: {error}"
    if isinstance(error, InvalidPath):
        return str(error)
    if isinstance(error, FileExistsError):
        return "the file or folder already exists"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a folder"
    if isinstance(error, NotADirectoryError):
        return "not a folder"
    if isinstance(error, OverflowError):
        return "offset or size out of range"  # an offset or size of 2**63 or more
    if isinstance(error, OffsetPastEnd):
        return str(error)  # FTP REST beyond the end of the file
    if isinstance(error, OSError):
        if error.errno == errno.ENOTEMPTY:
            return "the folder is not empty"
        return error.strerror or "the operation failed"
    return "internal error"


def attribute_change(size: Optional[int], times: Optional[tuple[float, float]]) -> str:
    """How a change of attributes (SFTP setstat, FTP MFMT) is named in the log."""
    truncate = [f"truncate to {size} byte{'' if size == 1 else 's'}"] if size is not None else []
    return " and ".join(truncate + (["set times"] if times is not None else [])) or "set permissions or owner (ignored)"


def is_inside(root: str, path: str) -> bool:
    return _within(root, os.path.realpath(path))


def _within(root: str, real: str) -> bool:
    """Whether a real path (links resolved already) is ``root`` or below it."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _seen_from(root: str, real: str) -> str:
    """The path the session sees for ``real``, a real path inside ``root``: ``/`` is ``root``."""
    relative = os.path.relpath(real, root)
    return "/" if relative == os.curdir else "/" + relative


class Listed(NamedTuple):
    """One entry of a listing: its name, its ``lstat`` result, and for a symlink what it points to.

    ``link`` is the target as the session sees it, relative to the link's
    folder (``../shared``, ``report.txt``), worked out from where the link
    really leads: never the server path the link holds. Its ``st_size`` is
    the length of that text, as ``lstat`` gives the length of what a link holds.
    """

    name: str
    result: os.stat_result
    link: Optional[str] = None


def _link_entry(root: str, real: str, result: os.stat_result) -> Optional[Listed]:
    """The :class:`Listed` of the symlink ``real`` (``result``: its ``lstat``); None when it leads outside ``root``.

    A link that leads nowhere inside is listed (it can be deleted); one that
    leads outside is neither listed nor usable (:func:`resolve`).
    """
    target = os.path.realpath(real)
    if os.path.islink(target):  # a loop (a -> b -> a): realpath stops on it; show the next step as the link holds it
        target = os.path.normpath(os.path.join(os.path.dirname(real), os.readlink(real)))
    if not _within(root, target):
        return None
    shown = posixpath.relpath(_seen_from(root, target), _seen_from(root, os.path.dirname(real)))
    sized = tuple(result)[:6] + (len(disk_bytes(shown)),) + tuple(result)[7:]
    times = {name: getattr(result, name) for name in ("st_atime", "st_mtime", "st_ctime")}
    return Listed(os.path.basename(real), os.stat_result(sized, times), shown)


class JailedFilesystem:
    """File operations of one session, inside its home folder, with permissions."""

    def __init__(
        self,
        home_folder: str,
        permissions: frozenset[Permission],
        run_in_thread: Callable[..., defer.Deferred],
        resolved: bool = False,
        log_as: str = "",
    ):
        # A login's root was resolved in a thread by the chain (Account.home_root).
        self.root = home_folder if resolved else os.path.realpath(home_folder)
        self.permissions = permissions
        self._run_in_thread = run_in_thread
        self.log_as = log_as  # "ftp alice": each change, or its refusal, is a server log line (log_change)

    def log_change(self, d: defer.Deferred, change: str, *client_paths: Union[str, bytes], cwd: str = "/",
                   reason_of: Callable[[BaseException], str] = describe_failure) -> defer.Deferred:
        """Log the change a client asked for when ``d`` ends: ``sftp alice: remove /a.txt``, or ``... refused: reason``.

        Every change of FTP and SFTP is logged here, so both protocols say
        the same in the same words; reads and listings are not logged.
        ``reason_of`` words a failure (one the protocol has already worded).
        """
        if not self.log_as:
            return d
        shown = " -> ".join(_shown_path(path, cwd) for path in client_paths)

        def done(result: Any) -> Any:
            _log.info("{session}: {change} {path}", session=self.log_as, change=change, path=shown)
            return result

        def refused(failure: Any) -> Any:
            _log.info(
                "{session}: {change} {path} refused: {reason}",
                session=self.log_as, change=change, path=shown, reason=reason_of(failure.value),
            )
            return failure

        return d.addCallbacks(done, refused)

    def log_failed_write(self, virtual: str, error: BaseException, written: int) -> None:
        """Warn that writing an open file failed (a full disk, a quota), with the reason and how far it got.

        Called once per upload (FTP) or open handle (SFTP): the client's
        retries of a full disk are each an upload of their own, logged so.
        """
        if self.log_as:
            _log.warn(
                "{session}: writing {path} failed after {written} bytes: {reason}",
                session=self.log_as, path=printable(virtual), written=written, reason=describe_failure(error),
            )

    # -- helpers -------------------------------------------------------------------

    def require(self, permission: Union[Permission, tuple[Permission, ...]], path: str) -> None:
        """Raise PermissionDenied unless the permission (or one of a tuple of them) is granted."""
        wanted = permission if isinstance(permission, tuple) else (permission,)
        if not self.permissions.intersection(wanted):
            raise PermissionDenied(wanted[0], path)

    def resolve(self, client_path: Union[str, bytes], cwd: str = "/") -> str:
        return resolve(self.root, client_path, cwd)

    def _call(self, permission, client_path, cwd: str, function, *args, creates: bool = False,
              entry: bool = False, creates_file: bool = False, opens_folder: bool = False,
              change: str = "") -> defer.Deferred:
        """Check permission (and the name of what ``creates`` makes), then resolve and run ``function(real_path, *args)`` in a thread.

        ``entry``: the path's last name is not followed (:func:`resolve_entry`): removing acts on a link itself.
        A path written as a folder's (``name/``) must not be a file (:func:`_require_folder`), unless
        ``opens_folder``: ``function`` opens it as a folder (``O_DIRECTORY``), which refuses a file itself.
        ``change``: what the operation changes, for the log (:meth:`log_change`); reads are not logged.
        """
        try:
            virtual = virtual_path(client_path, cwd)
            if creates:
                check_new_name(virtual)
            if permission is not None:
                self.require(permission, virtual)
            folder_named = names_a_folder(client_path) and not opens_folder
        except Exception:
            d = defer.fail()
        else:
            resolver = resolve_entry if entry else resolve

            def work():
                if folder_named:
                    _require_folder(self.root, virtual, entry, creates_file)
                return function(resolver(self.root, virtual), *args)

            d = self._run_in_thread(work)
        return self.log_change(d, change, client_path, cwd=cwd) if change else d

    # -- operations ----------------------------------------------------------------

    def stat(self, client_path, cwd: str = "/") -> defer.Deferred:
        """``os.stat`` of a path (following symlinks that stay inside).

        Allowed with allow-list or allow-read: clients stat a file before
        downloading it, so a read-only group must be able to.
        """
        return self._call((Permission.LIST, Permission.READ), client_path, cwd, self._stat)

    def _stat(self, real: str) -> os.stat_result:
        # resolve() followed every link that stays inside: what is left to stat is no link, but for a loop
        result = _lstat_beneath(self.root, real)
        if stat_module.S_ISLNK(result.st_mode):
            raise OSError(errno.ELOOP, "too many levels of symbolic links")
        return result

    def lstat(self, client_path, cwd: str = "/") -> defer.Deferred:
        """The :class:`Listed` of the entry a path names, itself: a symlink as a link, not as what it points to.

        As :meth:`stat` for anything else, and with the same permissions.
        A link that leads outside is OutsideJail (:func:`resolve_entry`).
        ``link/`` names what the link points to, as for ``lstat(2)``.
        """
        entry = not names_a_folder(client_path)
        return self._call((Permission.LIST, Permission.READ), client_path, cwd, self._entry, entry=entry)

    def _entry(self, real: str) -> Listed:
        result = _lstat_beneath(self.root, real)
        if stat_module.S_ISLNK(result.st_mode):
            listed = _link_entry(self.root, real, result)
            if listed is None:
                raise OutsideJail(_seen_from(self.root, real))  # never: resolve_entry refuses it
            return listed
        return Listed(os.path.basename(real), result)

    def read_link(self, client_path, cwd: str = "/") -> defer.Deferred:
        """What a symlink points to, as the session sees it (:class:`Listed`); OSError EINVAL for anything else."""

        def target(listed: Listed) -> str:
            if listed.link is None:
                raise OSError(errno.EINVAL, "not a symbolic link")
            return listed.link

        return self.lstat(client_path, cwd).addCallback(target)

    def require_existing(self, client_path, cwd: str = "/") -> defer.Deferred:
        """None, or FileNotFoundError when nothing has that name; needs no permission (the caller checks its own)."""
        return self._call(None, client_path, cwd, lambda real: self._stat(real) and None)

    def is_directory(self, client_path, cwd: str = "/") -> defer.Deferred:
        """Whether a path is a folder; needs no permission (CWD, realpath)."""
        asked = self._call(None, client_path, cwd, self._is_directory)
        return asked.addErrback(lambda failure: failure.trap(NotADirectoryError) and False)  # file/

    def _is_directory(self, real: str) -> bool:
        try:
            return stat_module.S_ISDIR(self._stat(real).st_mode)
        except OSError:
            return False

    def list_directory(self, client_path, cwd: str = "/") -> defer.Deferred:
        """``[(name, stat_result)]`` of a folder, sorted by name; entries leading outside are hidden.

        A whole list: for a small folder (IFTPShell ``list``). Listings sent
        to clients read it a batch at a time (:meth:`open_listing`).
        """
        return self.open_listing(client_path, cwd, then=lambda reader: reader.read_all())

    def open_listing(
        self,
        client_path,
        cwd: str = "/",
        folder_only: bool = False,
        then: Optional[Callable[["FolderReader"], Any]] = None,
    ) -> defer.Deferred:
        """A :class:`FolderReader` of a folder's entries sorted by name (FTP listings), or ``then(reader)``.

        Only the names are held (sorted), not their stat results: each
        batch is stat-ed as it is read. A file is listed as itself, under
        the last name of the path as given: a link's own name, not its
        target's, as ``ls -l link`` shows it (FTP ``LIST file``; SFTP
        ``opendir`` uses :meth:`open_folder`, which refuses it).
        ``folder_only``: a file is NotADirectoryError instead (FTP ``MLSD``).
        ``then`` runs in the same thread trip.
        """

        def open_(real: str):
            result = self._stat(real)  # a missing one is FileNotFoundError, also with folder_only
            if not stat_module.S_ISDIR(result.st_mode):
                name = posixpath.basename(virtual_path(client_path, cwd))
                if folder_only:
                    raise NotADirectoryError(errno.ENOTDIR, "not a folder", name)
                reader = FolderReader(iter([Listed(name, result)]), listed=lambda listed: listed)
            else:
                reader = self._folder_reader(real, _sorted_names, lambda name: name)
            return reader if then is None else then(reader)

        return self._call(Permission.LIST, client_path, cwd, open_)

    def _folder_reader(self, real: str, entries_of: Callable[[int], Any], name_of: Callable[[Any], str]) -> "FolderReader":
        """A :class:`FolderReader` of the folder ``real``, opened beneath the root and closed with the reader.

        ``entries_of(descriptor)`` gives what is read (scandir's entries, or
        sorted names), ``name_of`` the name of each.
        """
        folder = _open_beneath(self.root, real, _FOLDER_FLAGS)
        try:
            entries = entries_of(folder)
        except BaseException:
            os.close(folder)
            raise
        return FolderReader(entries, listed=lambda entry: self._listed(folder, real, name_of(entry)),
                            closing=lambda: os.close(folder))

    def _listed(self, folder: int, real: str, name: str) -> Optional[Listed]:
        """The :class:`Listed` of the entry ``name`` of the open ``folder`` (real path ``real``); None when it is not listed (a link leading outside, vanished).

        A symlink is listed as a link (``ls -l`` shows it so), never as what
        it points to: a client that deletes a folder recursively deletes the
        link, instead of going through a link to a folder and deleting what
        is there (or, through a link to a folder above, everything).
        """
        try:
            result = os.stat(name, dir_fd=folder, follow_symlinks=False)
            if stat_module.S_ISLNK(result.st_mode):
                return _link_entry(self.root, os.path.join(real, name), result)
        except OSError:
            return None  # vanished meanwhile
        return Listed(name, result)

    def open_folder(self, client_path, cwd: str = "/", then: Optional[Callable[["FolderReader"], Any]] = None) -> defer.Deferred:
        """A :class:`FolderReader` of a folder (NotADirectoryError for a file), or ``then(reader)`` in the same thread trip."""

        def open_(real: str):
            reader = self._folder_reader(real, os.scandir, lambda entry: entry.name)  # NotADirectoryError for a file
            return reader if then is None else then(reader)

        return self._call(Permission.LIST, client_path, cwd, open_, opens_folder=True)

    def open_for_reading(self, client_path, cwd: str = "/", offset: int = 0) -> defer.Deferred:
        """The file, positioned at ``offset`` (a resumed download); OffsetPastEnd beyond its end."""
        return self._call(Permission.READ, client_path, cwd, self._open_read, offset)

    def _open_read(self, real: str, offset: int):
        file = _open_file_beneath(self.root, real, os.O_RDONLY, "rb")
        if offset:
            _seek(file, offset)
        return file

    def open_for_writing(
        self, client_path, cwd: str = "/", append: bool = False, offset: int = 0
    ) -> defer.Deferred:
        """A :class:`PreparedUpload`: a file to empty; ``append``: written at its end; ``offset``: kept up to it,
        written from it (a resumed upload). Nothing is emptied or cut before :meth:`PreparedUpload.begin`."""
        change = "append to" if append else f"upload from byte {offset} to" if offset else "upload to"
        return self._call(Permission.WRITE, client_path, cwd, self._open_write, append, offset, creates=True,
                          creates_file=True, change=change)

    def _open_write(self, real: str, append: bool, offset: int) -> PreparedUpload:
        """Opened without O_TRUNC and locked (see :func:`_lock_upload`); at ``offset`` when resumed."""
        created = False
        if offset:
            file = _open_file_beneath(self.root, real, os.O_RDWR, "r+b")  # an upload resumed at offset: the file must exist
        else:
            flags, mode = (os.O_WRONLY | os.O_APPEND, "ab") if append else (os.O_WRONLY, "wb")
            try:
                file = _open_file_beneath(self.root, real, flags | os.O_CREAT | os.O_EXCL, mode)
                created = True
            except FileExistsError:
                file = _open_file_beneath(self.root, real, flags | os.O_CREAT, mode)
        _lock_upload(file)
        if offset:
            _seek(file, offset)
        return PreparedUpload(file, real, cut=not append, created=created)

    def abandon_upload(self, upload: PreparedUpload, virtual: str) -> defer.Deferred:
        """Close an upload that never began; remove its file if opening it created it (and it is still that file).

        Logged after the open's "upload to" line, which it undoes.
        """
        abandoning = self._run_in_thread(self._abandon, upload)

        def logged(removed: bool) -> None:
            if self.log_as:
                _log.info(
                    "{session}: upload to {path} got no data: {outcome}", session=self.log_as,
                    path=printable(virtual),
                    outcome="the file it created is removed" if removed else "the file is as it was",
                )

        return abandoning.addCallback(logged)

    def _abandon(self, upload: PreparedUpload) -> bool:
        with upload.file:
            if not upload.created:
                return False
            mine = os.fstat(upload.file.fileno())
            with _beneath(self.root, upload.real) as (folder, name):
                there = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino) and there.st_size == 0:
                    os.unlink(name, dir_fd=folder)
                    return True
        return False

    def open_file(self, client_path, flags: int, mode: int = 0o644, cwd: str = "/") -> defer.Deferred:
        """``os.open`` with SFTP-style flags; WRITE for any write flag, READ otherwise.

        ``O_CREAT`` of a name :func:`check_new_name` refuses opens an existing
        file of that name and creates none (``O_EXCL``: refused outright).
        """
        opened = self._open_file(client_path, flags, mode, cwd)
        return self.log_change(opened, "open for writing", client_path, cwd=cwd) if flags & _WRITE_FLAGS else opened

    def _open_file(self, client_path, flags: int, mode: int, cwd: str) -> defer.Deferred:
        refused: Optional[InvalidName] = None
        try:
            virtual = virtual_path(client_path, cwd)
            if flags & os.O_CREAT:
                try:
                    check_new_name(virtual)
                except InvalidName as error:
                    if flags & os.O_EXCL:
                        raise
                    refused, flags = error, flags & ~os.O_CREAT
            reading = not (flags & os.O_WRONLY)
            if flags & _WRITE_FLAGS:
                self.require(Permission.WRITE, virtual)
            if reading:
                self.require(Permission.READ, virtual)
        except Exception:
            return defer.fail()

        folder_named = names_a_folder(client_path)

        def work():
            if folder_named:
                _require_folder(self.root, virtual, False, bool(flags & os.O_CREAT))
            try:
                return _open_file_descriptor(self.root, resolve(self.root, virtual), flags, mode & 0o777, virtual)
            except FileNotFoundError:
                if refused is not None:
                    raise refused from None  # it did not exist: say why it was not made
                raise

        return self._run_in_thread(work)

    def make_directory(self, client_path, cwd: str = "/") -> defer.Deferred:
        return self._call(Permission.CREATE_FOLDER, client_path, cwd, self._mkdir, creates=True, change="make folder")

    def _mkdir(self, real: str) -> None:
        with _beneath(self.root, real) as (folder, name):
            os.mkdir(name, 0o755, dir_fd=folder)

    def remove_directory(self, client_path, cwd: str = "/") -> defer.Deferred:
        """Remove an empty folder; a symlink to a folder is not one (NotADirectoryError: DELE removes the link)."""
        return self._call(Permission.DELETE_FOLDER, client_path, cwd, self._rmdir, entry=True, change="remove folder")

    def _rmdir(self, real: str) -> None:
        refuse_home_folder(self.root, real, "removed")
        with _beneath(self.root, real) as (folder, name):
            os.rmdir(name, dir_fd=folder)

    def remove_file(self, client_path, cwd: str = "/") -> defer.Deferred:
        """Remove a file, or a symlink itself (whatever it points to, even a folder or nothing)."""
        return self._call(Permission.DELETE_FILE, client_path, cwd, self._remove, entry=True, change="remove")

    def _remove(self, real: str) -> None:
        with _beneath(self.root, real) as (folder, name):
            if stat_module.S_ISDIR(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a folder", real)
            os.unlink(name, dir_fd=folder)

    def rename(self, from_path, to_path, cwd: str = "/", overwrite: bool = True) -> defer.Deferred:
        renamed = self._rename(from_path, to_path, cwd, overwrite)
        return self.log_change(renamed, "rename", from_path, to_path, cwd=cwd)

    def _rename(self, from_path, to_path, cwd: str, overwrite: bool) -> defer.Deferred:
        try:
            source = virtual_path(from_path, cwd)
            target = virtual_path(to_path, cwd)
            check_new_name(target)
            self.require(Permission.RENAME, source)
        except Exception:
            return defer.fail()

        source_folder_named, target_folder_named = names_a_folder(from_path), names_a_folder(to_path)

        def work():
            if target == "/":  # RNTO /: the home folder is there, whatever the source is
                raise FileExistsError(errno.EEXIST, "the home folder exists", target)
            if source_folder_named or target_folder_named:
                # "dir/" may be moved, to "new/" too; a file, or a link itself, is not a folder (ENOTDIR).
                # A missing source is left to the rename, which says so.
                _require_folder(self.root, source, True, False)
            # A symlink named as the source or the target is renamed or replaced itself, not what it points to.
            real_source = resolve_entry(self.root, source)
            real_target = resolve_entry(self.root, target)
            refuse_home_folder(self.root, real_source, "renamed")
            with ExitStack() as opened:
                source_folder, source_name = opened.enter_context(_beneath(self.root, real_source))
                try:
                    target_folder, target_name = opened.enter_context(_beneath(self.root, real_target))
                except FileNotFoundError:
                    if _exists_beneath(self.root, real_source):
                        raise FileNotFoundError(errno.ENOENT, "the target's folder does not exist", target) from None
                    raise
                self._replace(source_folder, source_name, target_folder, target_name, target, overwrite)

        return self._run_in_thread(work)

    def _replace(self, source_folder: int, source_name: str, target_folder: int, target_name: str, target: str,
                 overwrite: bool) -> None:
        moved = os.stat(source_name, dir_fd=source_folder, follow_symlinks=False)  # a missing source says so first
        try:
            existing = os.stat(target_name, dir_fd=target_folder, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "the target exists", target)
            # Replacing a file destroys it: that needs the right to delete it.
            if stat_module.S_ISDIR(existing.st_mode):
                raise FileExistsError(errno.EEXIST, "the target is a folder", target)
            if stat_module.S_ISDIR(moved.st_mode):
                raise FileExistsError(errno.EEXIST, "a folder cannot replace a file", target)
            self.require(Permission.DELETE_FILE, target)
        try:
            os.rename(source_name, target_name, src_dir_fd=source_folder, dst_dir_fd=target_folder)
        except OSError as error:
            if error.errno == errno.EINVAL:  # rename(2): a folder into itself, or below itself
                raise OSError(errno.EINVAL, "a folder cannot be moved into itself", target) from None
            raise

    def set_times(self, client_path, atime: float, mtime: float, cwd: str = "/") -> defer.Deferred:
        return self.set_attributes(client_path, times=(atime, mtime), cwd=cwd)

    def set_attributes(self, client_path, size: Optional[int] = None, times: Optional[tuple[float, float]] = None,
                       cwd: str = "/") -> defer.Deferred:
        """Change a file's size (truncate or extend), then its (atime, mtime); needs allow-write.

        Gives the file's ``os.stat_result`` after the change: a filesystem
        may store another time than the one asked for (ext4 keeps 1901-2446).
        Neither (SFTP ``chmod``, whose bits are ignored) still needs
        allow-write, and a missing file is still said so.
        """
        change = attribute_change(size, times)
        return self._call(Permission.WRITE, client_path, cwd, self._change_attributes, size, times, change=change)

    def _change_attributes(self, real: str, size: Optional[int], times: Optional[tuple[float, float]]) -> os.stat_result:
        with _beneath(self.root, real) as (folder, name):  # one walk for both changes
            if size is not None:
                # a folder: IsADirectoryError
                descriptor = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
                try:
                    change_attributes(descriptor, size, None)
                finally:
                    os.close(descriptor)
            if times is not None:  # after the size: truncating moves mtime
                os.utime(name, times, dir_fd=folder, follow_symlinks=False)
            return os.stat(name, dir_fd=folder, follow_symlinks=False)

    def statvfs(self, client_path, cwd: str = "/") -> defer.Deferred:
        """``os.statvfs`` of the file system holding a path (SFTP ``df``); allowed as :meth:`stat` is."""
        return self._call((Permission.LIST, Permission.READ), client_path, cwd, self._statvfs)

    def _statvfs(self, real: str) -> os.statvfs_result:
        descriptor = _open_beneath(self.root, real, _WALK_FLAGS & ~os.O_DIRECTORY)
        try:
            return os.statvfs(descriptor)
        finally:
            os.close(descriptor)

    def run(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run other blocking file work (reads, writes of an open file) in the thread pool."""
        return self._run_in_thread(function, *args)


def change_attributes(target: Union[str, int], size: Optional[int], times: Optional[tuple[float, float]]) -> None:
    """Truncate (or extend) a file given by path or descriptor, then set its times: the size change moves mtime."""
    if size is not None:
        (os.ftruncate if isinstance(target, int) else os.truncate)(target, size)
    if times is not None:
        os.utime(target, times)


class FolderReader:
    """A folder's entries read a batch at a time: memory for one batch, not for the whole folder.

    SFTP's READDIR reads with it (:meth:`JailedFilesystem.open_folder`), so a
    folder of 200,000 entries opened 256 times does not hold 200,000 entries
    256 times; the entries come in the folder's own order, as OpenSSH's
    sftp-server sends them (clients sort), and the folder stays open (one
    descriptor) until the end or :meth:`close`. FTP listings are sorted
    (:meth:`JailedFilesystem.open_listing`): only the names are held, and
    each batch is stat-ed as it is read. Blocking: call :meth:`read` and
    :meth:`close` in the thread pool, one at a time.
    """

    def __init__(self, iterator: Any, listed: Callable[[Any], Optional[Listed]],
                 closing: Optional[Callable[[], None]] = None):
        # ``listed`` turns what the iterator gives into an entry (None: not listed); ``closing``
        # releases what the entries are read from (the folder's descriptor), once.
        self._listed = listed
        self._iterator = iterator
        self._closing = closing
        self.finished = False

    def read(self, count: int) -> list[Listed]:
        """Up to ``count`` listed entries; fewer only at the end, after which the folder is closed."""
        entries: list[Listed] = []
        while not self.finished and len(entries) < count:
            entry = next(self._iterator, None)
            if entry is None:
                self.close()
            else:
                listed = self._listed(entry)
                if listed is not None:
                    entries.append(listed)
        return entries

    def read_all(self) -> list[Listed]:
        """Every entry left (blocking, as :meth:`read`)."""
        entries: list[Listed] = []
        while not self.finished:
            entries += self.read(1024)
        return entries

    def close(self) -> None:
        self.finished = True
        close = getattr(self._iterator, "close", None)  # a folder's scandir; a list of names has none
        if close is not None:
            close()
        closing, self._closing = self._closing, None
        if closing is not None:
            closing()

