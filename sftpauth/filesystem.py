"""The jail: every client path of FTP and SFTP goes through :func:`resolve` (or :func:`resolve_entry`).

A session sees its home folder as ``/``. ``..`` stops at ``/``, absolute
names are taken inside the home folder, and the real path (symlinks
followed) must still be inside it, so a symlink planted in a home folder
cannot reach ``/etc``. Names with NUL bytes, over-long names and
undecodable bytes are refused.

:class:`JailedFilesystem` is the only place that touches files for a
session: it resolves the path, checks the primary group's permission, and
does the I/O in a thread so the reactor never waits on a disk.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat as stat_module
from typing import Any, Callable, Optional, Union

from twisted.internet import defer

from sftpauth.permissions import Permission, PermissionDenied

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


def resolve(root: str, client_path: Union[str, bytes], cwd: str = "/") -> str:
    """The real filesystem path of ``client_path``; never outside ``root``.

    ``root`` must already be a real path (see :class:`JailedFilesystem`).
    """
    virtual = virtual_path(client_path, cwd)
    candidate = os.path.join(root, virtual.lstrip("/"))
    real = os.path.realpath(candidate)
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise OutsideJail(virtual)
    return real


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


def _seek(file, offset: int) -> None:
    """Position an open file at ``offset``, which may be its end but not past it (closed then)."""
    size = os.fstat(file.fileno()).st_size
    if offset > size:
        file.close()
        raise OffsetPastEnd(offset, size)
    file.seek(offset)


def is_inside(root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class JailedFilesystem:
    """File operations of one session, inside its home folder, with permissions."""

    def __init__(
        self,
        home_folder: str,
        permissions: frozenset[Permission],
        run_in_thread: Callable[..., defer.Deferred],
        resolved: bool = False,
    ):
        # A login's root was resolved in a thread by the chain (Account.home_root).
        self.root = home_folder if resolved else os.path.realpath(home_folder)
        self.permissions = permissions
        self._run_in_thread = run_in_thread

    # -- helpers -------------------------------------------------------------------

    def require(self, permission: Union[Permission, tuple[Permission, ...]], path: str) -> None:
        """Raise PermissionDenied unless the permission (or one of a tuple of them) is granted."""
        wanted = permission if isinstance(permission, tuple) else (permission,)
        if not self.permissions.intersection(wanted):
            raise PermissionDenied(wanted[0], path)

    def resolve(self, client_path: Union[str, bytes], cwd: str = "/") -> str:
        return resolve(self.root, client_path, cwd)

    def _call(self, permission, client_path, cwd: str, function, *args, creates: bool = False,
              entry: bool = False) -> defer.Deferred:
        """Check permission (and the name of what ``creates`` makes), then resolve and run ``function(real_path, *args)`` in a thread.

        ``entry``: the path's last name is not followed (:func:`resolve_entry`): removing acts on a link itself.
        """
        try:
            virtual = virtual_path(client_path, cwd)
            if creates:
                check_new_name(virtual)
            if permission is not None:
                self.require(permission, virtual)
        except Exception:
            return defer.fail()
        resolver = resolve_entry if entry else resolve

        def work():
            return function(resolver(self.root, virtual), *args)

        return self._run_in_thread(work)

    # -- operations ----------------------------------------------------------------

    def stat(self, client_path, cwd: str = "/") -> defer.Deferred:
        """``os.stat`` of a path (following symlinks that stay inside).

        Allowed with allow-list or allow-read: clients stat a file before
        downloading it, so a read-only group must be able to.
        """
        return self._call((Permission.LIST, Permission.READ), client_path, cwd, os.stat)

    def is_directory(self, client_path, cwd: str = "/") -> defer.Deferred:
        """Whether a path is a folder; needs no permission (CWD, realpath)."""
        return self._call(None, client_path, cwd, os.path.isdir)

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
            if not os.path.isdir(real):
                result = os.stat(real)  # a missing one is FileNotFoundError, also with folder_only
                name = posixpath.basename(virtual_path(client_path, cwd))
                if folder_only:
                    raise NotADirectoryError(errno.ENOTDIR, "not a folder", name)
                reader = FolderReader(iter([(name, result)]), listed=lambda listed: listed)
            else:
                with os.scandir(real) as iterator:
                    names = sorted(entry.name for entry in iterator)
                reader = FolderReader(iter(names), listed=lambda name: self._listed(real, name))
            return reader if then is None else then(reader)

        return self._call(Permission.LIST, client_path, cwd, open_)

    def _listed(self, folder: str, name: str) -> Optional[tuple[str, os.stat_result]]:
        """``(name, stat_result)`` of the entry ``name`` of ``folder``, None when it is not listed (leads outside, vanished, dangling)."""
        path = os.path.join(folder, name)
        try:
            result = os.lstat(path)
            if stat_module.S_ISLNK(result.st_mode):
                if not is_inside(self.root, path):
                    return None
                return name, os.stat(path)
            return name, result
        except OSError:
            return None

    def open_folder(self, client_path, cwd: str = "/", then: Optional[Callable[["FolderReader"], Any]] = None) -> defer.Deferred:
        """A :class:`FolderReader` of a folder (NotADirectoryError for a file), or ``then(reader)`` in the same thread trip."""

        def open_(real: str):
            entries = os.scandir(real)  # NotADirectoryError for a file
            reader = FolderReader(entries, listed=lambda entry: self._listed(real, entry.name))
            return reader if then is None else then(reader)

        return self._call(Permission.LIST, client_path, cwd, open_)

    def open_for_reading(self, client_path, cwd: str = "/", offset: int = 0) -> defer.Deferred:
        """The file, positioned at ``offset`` (a resumed download); OffsetPastEnd beyond its end."""
        return self._call(Permission.READ, client_path, cwd, self._open_read, offset)

    @staticmethod
    def _open_read(real: str, offset: int):
        if os.path.isdir(real):
            raise IsADirectoryError(errno.EISDIR, "is a folder", real)
        file = open(real, "rb")
        if offset:
            _seek(file, offset)
        return file

    def open_for_writing(
        self, client_path, cwd: str = "/", append: bool = False, offset: int = 0
    ) -> defer.Deferred:
        """A new or emptied file; ``append``: written at its end; ``offset``: kept up to it, written from it (a resumed upload)."""
        return self._call(Permission.WRITE, client_path, cwd, self._open_write, append, offset, creates=True)

    @staticmethod
    def _open_write(real: str, append: bool, offset: int):
        if os.path.isdir(real):
            raise IsADirectoryError(errno.EISDIR, "is a folder", real)
        if not offset:
            return open(real, "ab" if append else "wb")
        file = open(real, "r+b")  # an upload resumed at offset: the file must exist
        _seek(file, offset)
        file.truncate()
        return file

    def open_file(self, client_path, flags: int, mode: int = 0o644, cwd: str = "/") -> defer.Deferred:
        """``os.open`` with SFTP-style flags; WRITE for any write flag, READ otherwise.

        ``O_CREAT`` of a name :func:`check_new_name` refuses opens an existing
        file of that name and creates none (``O_EXCL``: refused outright).
        """
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
            writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC)
            reading = not (flags & os.O_WRONLY)
            if writing:
                self.require(Permission.WRITE, virtual)
            if reading:
                self.require(Permission.READ, virtual)
        except Exception:
            return defer.fail()

        def work():
            real = self.resolve(virtual)
            if os.path.isdir(real):
                raise IsADirectoryError(errno.EISDIR, "is a folder", virtual)
            try:
                return os.open(real, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), mode & 0o777)
            except FileNotFoundError:
                if refused is not None:
                    raise refused from None  # it did not exist: say why it was not made
                raise

        return self._run_in_thread(work)

    def make_directory(self, client_path, cwd: str = "/") -> defer.Deferred:
        return self._call(Permission.CREATE_FOLDER, client_path, cwd, os.mkdir, 0o755, creates=True)

    def remove_directory(self, client_path, cwd: str = "/") -> defer.Deferred:
        """Remove an empty folder; a symlink to a folder is not one (NotADirectoryError: DELE removes the link)."""
        return self._call(Permission.DELETE_FOLDER, client_path, cwd, self._rmdir, entry=True)

    def _rmdir(self, real: str) -> None:
        if real == self.root:
            raise PermissionError(errno.EACCES, "the home folder cannot be removed", "/")
        os.rmdir(real)

    def remove_file(self, client_path, cwd: str = "/") -> defer.Deferred:
        """Remove a file, or a symlink itself (whatever it points to, even a folder or nothing)."""
        return self._call(Permission.DELETE_FILE, client_path, cwd, self._remove, entry=True)

    @staticmethod
    def _remove(real: str) -> None:
        if stat_module.S_ISDIR(os.lstat(real).st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder", real)
        os.remove(real)

    def rename(self, from_path, to_path, cwd: str = "/", overwrite: bool = True) -> defer.Deferred:
        try:
            source = virtual_path(from_path, cwd)
            target = virtual_path(to_path, cwd)
            check_new_name(target)
            self.require(Permission.RENAME, source)
        except Exception:
            return defer.fail()

        def work():
            # A symlink named as the source or the target is renamed or replaced itself, not what it points to.
            real_source = resolve_entry(self.root, source)
            real_target = resolve_entry(self.root, target)
            if real_source == self.root:
                raise PermissionError(errno.EACCES, "the home folder cannot be renamed", "/")
            if os.path.lexists(real_target):
                if not overwrite:
                    raise FileExistsError(errno.EEXIST, "the target exists", target)
                # Replacing a file destroys it: that needs the right to delete it.
                if stat_module.S_ISDIR(os.lstat(real_target).st_mode):
                    raise FileExistsError(errno.EEXIST, "the target is a folder", target)
                self.require(Permission.DELETE_FILE, target)
            try:
                os.rename(real_source, real_target)
            except FileNotFoundError:
                if os.path.lexists(real_source):  # then the missing one is the target's folder
                    raise FileNotFoundError(errno.ENOENT, "the target's folder does not exist", target) from None
                raise

        return self._run_in_thread(work)

    def set_times(self, client_path, atime: float, mtime: float, cwd: str = "/") -> defer.Deferred:
        return self.set_attributes(client_path, times=(atime, mtime), cwd=cwd)

    def set_attributes(self, client_path, size: Optional[int] = None, times: Optional[tuple[float, float]] = None,
                       cwd: str = "/") -> defer.Deferred:
        """Change a file's size (truncate or extend), then its (atime, mtime); needs allow-write."""
        return self._call(Permission.WRITE, client_path, cwd, change_attributes, size, times)

    def statvfs(self, client_path, cwd: str = "/") -> defer.Deferred:
        """``os.statvfs`` of the file system holding a path (SFTP ``df``); allowed as :meth:`stat` is."""
        return self._call((Permission.LIST, Permission.READ), client_path, cwd, os.statvfs)

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

    def __init__(self, iterator: Any, listed: Callable[[Any], Optional[tuple[str, os.stat_result]]]):
        # ``listed`` turns what the iterator gives into an entry (None: not listed)
        self._listed = listed
        self._iterator = iterator
        self.finished = False

    def read(self, count: int) -> list[tuple[str, os.stat_result]]:
        """Up to ``count`` listed entries; fewer only at the end, after which the folder is closed."""
        entries: list[tuple[str, os.stat_result]] = []
        while not self.finished and len(entries) < count:
            entry = next(self._iterator, None)
            if entry is None:
                self.close()
            else:
                listed = self._listed(entry)
                if listed is not None:
                    entries.append(listed)
        return entries

    def read_all(self) -> list[tuple[str, os.stat_result]]:
        """Every entry left (blocking, as :meth:`read`)."""
        entries: list[tuple[str, os.stat_result]] = []
        while not self.finished:
            entries += self.read(1024)
        return entries

    def close(self) -> None:
        self.finished = True
        close = getattr(self._iterator, "close", None)  # a folder's scandir; a list of names has none
        if close is not None:
            close()


def file_type_letter(mode: int) -> str:
    return "d" if stat_module.S_ISDIR(mode) else "l" if stat_module.S_ISLNK(mode) else "-"
