"""JailedFTPShell, the threaded file transfers and the FTP login, in memory."""

from __future__ import annotations

import errno
import os
import socket
import time
import types

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import ftp as twisted_ftp
from twisted.python import filepath
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sftpauth.auth.credentials import LoginRequest
from sftpauth.config.models import FTPServiceSettings
from sftpauth.auth.policy import FAILED_LOGIN_DELAY
from sftpauth.filesystem import JailedFilesystem, PreparedUpload
from sftpauth.ftp import (
    LOGIN_GRACE_SECONDS, MAX_QUEUED_COMMANDS, FileDownload, FileUpload, FTPReplyError, FTPServiceFactory, JailedFTPShell,
    keep_urgent_data_inline, list_line, listing_name, mlsx_facts, strip_telnet_commands,
)
from sftpauth.permissions import FULL_CONTROL, Permission
from sftpauth.realm import SessionInfo
from log_capture import captured_logs


class ManualThreads:
    """A run_in_thread whose work runs only when the test says so."""

    def __init__(self):
        self.pending: list[tuple] = []

    def __call__(self, function, *args):
        deferred = defer.Deferred()
        self.pending.append((function, args, deferred))
        return deferred

    def run_one(self) -> None:
        function, args, deferred = self.pending.pop(0)
        try:
            result = function(*args)
        except Exception:
            deferred.errback()
        else:
            deferred.callback(result)

    def run_all(self) -> None:
        while self.pending:
            self.run_one()


@implementer(IConsumer)
class RecordingConsumer:
    def __init__(self):
        self.chunks: list[bytes] = []
        self.producer = None
        self.unregistered = False

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.unregistered = True
        self.producer = None

    def write(self, data):
        self.chunks.append(data)


@implementer(IPushProducer)
class RecordingProducer:
    def __init__(self):
        self.events: list[str] = []

    def pauseProducing(self):
        self.events.append("pause")

    def resumeProducing(self):
        self.events.append("resume")

    def stopProducing(self):
        self.events.append("stop")


@pytest.fixture
def home(tmp_path):
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


@pytest.fixture
def shell(home, run_in_thread):
    return JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, run_in_thread))


def failure_of(deferred: defer.Deferred) -> Failure:
    failures = []
    deferred.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    return failures[0]


# -- the shell ------------------------------------------------------------------------


def test_shell_provides_iftpshell(shell):
    """JailedFTPShell implements Twisted's IFTPShell completely."""
    assert verifyObject(twisted_ftp.IFTPShell, shell)


def test_make_and_remove_directory(shell, home, result_of):
    """makeDirectory creates a folder; removeDirectory removes it."""
    result_of(shell.makeDirectory(["docs"]))
    assert (home / "docs").is_dir()
    result_of(shell.removeDirectory(["docs"]))
    assert not (home / "docs").exists()


def test_errors_become_ftp_errors(shell, home):
    """Filesystem errors map to FTP errors naming only the session path."""
    (home / "docs").mkdir()
    (home / "docs" / "f.txt").write_bytes(b"x")
    assert failure_of(shell.makeDirectory(["docs"])).check(twisted_ftp.FileExistsError)
    not_empty = failure_of(shell.removeDirectory(["docs"])).value
    assert isinstance(not_empty, FTPReplyError) and not_empty.response() == "550 /docs: Folder not empty."
    assert failure_of(shell.removeFile(["docs"])).value.response() == "550 /docs: Is a folder."
    assert failure_of(shell.removeFile(["missing"])).check(twisted_ftp.FileNotFoundError)
    assert failure_of(shell.openForReading(["docs"])).value.response() == "550 /docs: Is a folder."
    assert failure_of(shell.access(["docs", "f.txt"])).value.response() == "550 /docs/f.txt: Not a folder."
    assert failure_of(shell.access(["nope"])).value.response() == "550 /nope: No such file or directory."
    missing = failure_of(shell.openForReading(["nope", "x"])).value
    assert missing.response() == "550 /nope/x: No such file or directory."
    assert str(home) not in missing.response()


def test_an_unexpected_error_is_451_and_its_log_line_escapes_the_path():
    """An error no reply describes is 451 to the client; the log names the path with control characters escaped."""
    from twisted.logger import formatEvent

    from sftpauth.ftp import ftp_error

    with captured_logs() as events:
        reply = ftp_error(Failure(OSError(errno.EIO, "Input/output error")), "/odd\x1b[2Jname\udcff")
    assert reply.response() == "451 Requested action aborted: local error in processing."
    lines = [formatEvent(event) for event in events]
    assert lines == ["unexpected error on /odd\\x1b[2Jname\\xff"]


def test_a_read_only_file_system_is_550_without_a_critical_traceback():
    """QA (transfers): STOR, MKD or DELE on a file system mounted read-only got 451 "local error" and a critical
    traceback in the log per command. It is 550 with the reason, and nothing is logged as unexpected."""
    from sftpauth.ftp import ftp_error

    with captured_logs() as events:
        reply = ftp_error(Failure(OSError(errno.EROFS, "Read-only file system", "existing")), "/existing")
    assert reply.response() == "550 /existing: Read-only file system."
    assert events == []


def test_invalid_names_are_553(shell):
    """Names with undecodable bytes or line breaks are refused with 553."""
    for segments in (["bad\udcffname"], ["line\nbreak"], ["nul\0"]):
        error = failure_of(shell.makeDirectory(segments)).value
        assert error.response().startswith("553 "), segments
    assert failure_of(shell.rename(["a"], ["b\udcff"])).value.response().startswith("553 ")


def test_new_names_with_control_characters_are_553_and_existing_ones_stay_usable(shell, home, result_of):
    """MKD, STOR and RNTO refuse to create a name with an escape or another control character, as SFTP does."""
    (home / "a.txt").write_bytes(b"a")
    (home / "old\x1bname").write_bytes(b"made by other means")
    for attempt in (
        shell.makeDirectory(["x\x1b[31m"]),
        shell.openForWriting(["bell\x07.txt"]),
        shell.rename(["a.txt"], ["tab\tname"]),
    ):
        assert failure_of(attempt).value.response().startswith("553 File name not allowed: the name contains")
    assert sorted(os.listdir(home)) == ["a.txt", "old\x1bname"]
    assert result_of(shell.stat(["old\x1bname"], ("size",))) == [19]
    result_of(shell.removeFile(["old\x1bname"]))
    assert os.listdir(home) == ["a.txt"]


def test_rename(shell, home, result_of):
    """rename moves a file inside the home folder."""
    (home / "a.txt").write_bytes(b"a")
    result_of(shell.rename(["a.txt"], ["b.txt"]))
    assert (home / "b.txt").read_bytes() == b"a" and not (home / "a.txt").exists()


def test_rename_errors_about_the_target_name_the_target(shell, home):
    """RNTO onto a folder, or of a folder into itself, names the target in the 550, not the source."""
    (home / "a.txt").write_bytes(b"a")
    (home / "d1").mkdir()
    taken = failure_of(shell.rename(["a.txt"], ["d1"]))
    assert taken.check(twisted_ftp.FileExistsError) and taken.value.response() == "550 /d1: File exists"
    into_itself = failure_of(shell.rename(["d1"], ["d1", "inner"]))
    assert into_itself.value.response() == "550 /d1/inner: a folder cannot be moved into itself."
    into_missing = failure_of(shell.rename(["a.txt"], ["no-such-folder", "a.txt"]))
    assert into_missing.value.response() == "550 /no-such-folder/a.txt: No such file or directory."
    assert (home / "a.txt").read_bytes() == b"a"
    folder_onto_file = failure_of(shell.rename(["d1"], ["a.txt"]))
    assert folder_onto_file.value.response() == "550 /a.txt: File exists"
    assert (home / "d1").is_dir() and (home / "a.txt").read_bytes() == b"a"
    for source in (["a.txt"], ["d1"]):
        onto_home = failure_of(shell.rename(source, []))  # RNTO /: the home folder is there
        assert onto_home.value.response() == "550 /: File exists"
    assert (home / "d1").is_dir() and (home / "a.txt").read_bytes() == b"a"
    (home / "a.txt").unlink()
    gone = failure_of(shell.rename(["a.txt"], ["b.txt"]))
    assert gone.value.response() == "550 /a.txt: No such file or directory."


def test_rename_onto_a_file_without_allow_delete_file_names_the_target(home, run_in_thread, result_of):
    """Replacing b.txt deletes it: without allow-delete-file RNTO is "550 /b.txt: Permission denied", nothing moves."""
    (home / "a.txt").write_bytes(b"a")
    (home / "b.txt").write_bytes(b"b")
    no_delete = FULL_CONTROL - {Permission.DELETE_FILE}
    shell = JailedFTPShell(JailedFilesystem(str(home), no_delete, run_in_thread))
    refused = failure_of(shell.rename(["a.txt"], ["b.txt"])).value
    assert refused.response() == "550 /b.txt: Permission denied."
    assert (home / "a.txt").read_bytes() == b"a" and (home / "b.txt").read_bytes() == b"b"
    result_of(shell.rename(["a.txt"], ["c.txt"]))  # a new name deletes nothing
    assert (home / "c.txt").read_bytes() == b"a"


def test_rename_onto_a_link_leading_outside_names_the_target(shell, home, tmp_path):
    """RNTO onto a link leading outside (or into a folder through one) is 550 naming the target; a source outside names the source."""
    (tmp_path / "elsewhere").mkdir()
    (home / "ov.bin").write_bytes(b"x")
    (home / "out-link").symlink_to(tmp_path / "elsewhere" / "f.bin")
    (home / "out-folder").symlink_to(tmp_path / "elsewhere")
    onto = failure_of(shell.rename(["ov.bin"], ["out-link"])).value
    assert onto.response() == "550 /out-link: No such file or directory."
    into = failure_of(shell.rename(["ov.bin"], ["out-folder", "new.bin"])).value
    assert into.response() == "550 /out-folder/new.bin: No such file or directory."
    source = failure_of(shell.rename(["out-folder", "f.bin"], ["out-folder", "g.bin"])).value
    assert source.response() == "550 /out-folder/f.bin: No such file or directory."
    assert (home / "ov.bin").read_bytes() == b"x" and os.listdir(tmp_path / "elsewhere") == []


def test_rename_source_must_exist_inside_and_may_be_renamed(home, run_in_thread, result_of):
    """RNFR's check: a file or a link (even dangling) passes; a missing name or a link leading outside is not found."""
    (home / "a.txt").write_bytes(b"a")
    (home / "dangling").symlink_to(home / "gone")
    (home / "outside").symlink_to("/etc/passwd")
    shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, run_in_thread))
    result_of(shell.checkRenameSource(["a.txt"]))
    result_of(shell.checkRenameSource(["dangling"]))
    assert failure_of(shell.checkRenameSource(["missing"])).value.response() == "550 /missing: No such file or directory."
    assert failure_of(shell.checkRenameSource(["outside"])).value.response() == "550 /outside: No such file or directory."
    assert failure_of(shell.checkRenameSource([])).check(twisted_ftp.PermissionDeniedError)  # the home folder, as RNTO says
    reader = JailedFTPShell(JailedFilesystem(str(home), frozenset({Permission.READ, Permission.LIST}), run_in_thread))
    assert failure_of(reader.checkRenameSource(["a.txt"])).check(twisted_ftp.PermissionDeniedError)


def test_rename_source_is_checked_in_the_thread_pool(home):
    """The existence check touches the disk only in the thread pool, never on the reactor."""
    threads = ManualThreads()
    shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, threads))
    checked = shell.checkRenameSource(["missing"])
    assert not checked.called and len(threads.pending) == 1
    threads.run_all()
    assert failure_of(checked).check(twisted_ftp.FileNotFoundError)


def test_access_needs_an_existing_folder_inside(shell, home, result_of):
    """access (CWD) succeeds for folders only; files, missing names and escaping links fail."""
    (home / "dir").mkdir()
    (home / "file").write_bytes(b"")
    (home / "out").symlink_to("/etc")
    assert result_of(shell.access([])) is None
    assert result_of(shell.access(["dir"])) is None
    for segments in (["missing"], ["out"]):
        assert failure_of(shell.access(segments)).check(twisted_ftp.FileNotFoundError), segments
    assert failure_of(shell.access(["file"])).value.response() == "550 /file: Not a folder."


def test_access_needs_no_permission(home, run_in_thread, result_of):
    """CWD works even for a group without any permission, and says a file is no folder."""
    (home / "dir").mkdir()
    (home / "file").write_bytes(b"")
    shell = JailedFTPShell(JailedFilesystem(str(home), frozenset(), run_in_thread))
    assert result_of(shell.access(["dir"])) is None
    assert failure_of(shell.access(["file"])).value.response() == "550 /file: Not a folder."


def test_stat_values(shell, home, result_of):
    """stat returns the requested keys in order, as Twisted's list formatting expects."""
    (home / "f.bin").write_bytes(b"12345")
    os.chmod(home / "f.bin", 0o640)
    os.utime(home / "f.bin", (1000, 2000))
    size, directory, permissions, links, modified, owner, group = result_of(
        shell.stat(["f.bin"], ("size", "directory", "permissions", "hardlinks", "modified", "owner", "group"))
    )
    assert (size, directory, links, modified) == (5, False, 1, 2000)
    assert permissions.shorthand() == "rw-r-----"
    assert (owner, group) == ("ftp", "ftp")  # a shell made without an account's names
    assert result_of(shell.stat([], ("directory",))) == [True]


def test_listings_show_the_account_and_its_primary_group_as_owner(home, run_in_thread, result_of):
    """As SFTP listings do: the files belong to the server's system user, the account is virtual."""
    (home / "f.bin").write_bytes(b"1")
    shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, run_in_thread), ("alice", "demo-users"))
    assert result_of(shell.stat(["f.bin"], ("owner", "group"))) == ["alice", "demo-users"]
    assert result_of(shell.list([], ("owner", "group"))) == [("f.bin", ["alice", "demo-users"])]


def test_list_hides_links_outside_and_shows_links_inside(shell, home, result_of):
    """list names the folder's entries; a symlink leaving the home is not one of them; one inside is a link, no folder."""
    (home / "real").mkdir()
    (home / "a.txt").write_bytes(b"abc")
    (home / "inside").symlink_to(home / "real")
    (home / "outside").symlink_to("/etc")
    entries = result_of(shell.list([], ("size", "directory")))
    assert [name for name, _ in entries] == ["a.txt", "inside", "real"]
    assert dict(entries)["a.txt"] == [3, False]
    assert dict(entries)["inside"][1] is False and dict(entries)["real"][1] is True
    assert failure_of(shell.list(["outside"])).check(twisted_ftp.FileNotFoundError)
    assert result_of(shell.list(["a.txt"])) == [("a.txt", [])]


def test_a_folder_only_listing_refuses_a_file_with_501(shell, home, result_of):
    """MLSD's listing of a file is 501 (RFC 3659 7.2.1), in the same thread trip; other listings list the file."""
    (home / "f.txt").write_bytes(b"abc")
    refused = failure_of(shell.listing(["f.txt"], lambda entry: entry.name.encode(), folder_only=True)).value
    assert refused.response() == "501 /f.txt: Not a folder (MLST gives the facts of a file)."
    assert failure_of(shell.listing(["missing"], lambda entry: b"", folder_only=True)).check(twisted_ftp.FileNotFoundError)
    assert result_of(read_listing(shell, ["f.txt"], lambda entry: entry.name.encode())) == b"f.txt\r\n"
    assert result_of(read_listing(shell, [], lambda entry: entry.name.encode(), folder_only=True)) == b"f.txt\r\n"


def read_listing(shell, *args, **options):
    """The whole listing's bytes, as a data connection takes them."""
    consumer = RecordingConsumer()

    def send(download: FileDownload) -> defer.Deferred:
        return download.send(consumer).addCallback(lambda ignored: b"".join(consumer.chunks))

    return shell.listing(*args, **options).addCallback(send)


def test_permissions_are_enforced(home, run_in_thread):
    """Without the group's permission, each operation fails with PermissionDeniedError."""
    (home / "f.txt").write_bytes(b"x")
    (home / "d").mkdir()
    shell = JailedFTPShell(JailedFilesystem(str(home), frozenset({Permission.READ}), run_in_thread))
    for deferred in (
        shell.openForWriting(["new.txt"]),
        shell.openForWriting(["f.txt"], append=True),
        shell.removeFile(["f.txt"]),
        shell.makeDirectory(["x"]),
        shell.removeDirectory(["d"]),
        shell.rename(["f.txt"], ["g.txt"]),
        shell.list([]),
    ):
        error = failure_of(deferred).value
        assert isinstance(error, twisted_ftp.PermissionDeniedError)
        assert "Permission denied" in error.response()


def test_reading_through_a_link_outside_is_not_found(shell, home):
    """RETR through a planted symlink to /etc fails as not found."""
    (home / "etc").symlink_to("/etc")
    error = failure_of(shell.openForReading(["etc", "passwd"])).value
    assert isinstance(error, twisted_ftp.FileNotFoundError)


# -- downloads --------------------------------------------------------------------------


def test_download_streams_the_whole_file(shell, home, result_of):
    """send() writes the file to the consumer in chunks and unregisters at the end."""
    data = os.urandom(3 * FileDownload.chunk_size + 17)
    (home / "big").write_bytes(data)
    reader = result_of(shell.openForReading(["big"]))
    assert verifyObject(twisted_ftp.IReadFile, reader)
    consumer = RecordingConsumer()
    result_of(reader.send(consumer))
    assert b"".join(consumer.chunks) == data
    assert len(consumer.chunks) == 4
    assert consumer.unregistered


def test_download_reads_in_threads_and_waits_while_paused(home, tmp_path):
    """Each chunk is read by run_in_thread; no read is started while the consumer is paused."""
    (home / "f").write_bytes(b"a" * 10)
    threads = ManualThreads()
    reader = FileDownload(JailedFilesystem(str(home), FULL_CONTROL, threads), open(home / "f", "rb"))
    reader.chunk_size = 4
    consumer = RecordingConsumer()
    done = reader.send(consumer)
    assert len(threads.pending) == 1  # one read at a time
    reader.pauseProducing()
    threads.run_one()
    assert consumer.chunks == [b"aaaa"]
    assert threads.pending == []  # paused: nothing more is read
    reader.resumeProducing()
    threads.run_all()
    assert b"".join(consumer.chunks) == b"a" * 10
    assert done.called and consumer.unregistered


def test_download_stopped_by_the_consumer_closes_the_file(home):
    """stopProducing (the data connection was lost) closes the file and fails the transfer."""
    (home / "f").write_bytes(b"a" * 10)
    threads = ManualThreads()
    file = open(home / "f", "rb")
    reader = FileDownload(JailedFilesystem(str(home), FULL_CONTROL, threads), file)
    reader.chunk_size = 4
    done = reader.send(RecordingConsumer())
    reader.stopProducing()  # while a read is in flight
    assert not file.closed
    threads.run_all()
    assert file.closed
    assert failure_of(done).check(internet_error.ConnectionLost)


def test_a_listing_is_formatted_a_chunk_at_a_time_as_the_client_takes_it(home):
    """A big folder's LIST lines are made a chunk per thread trip, none while the data connection is paused; sorted."""
    names = [f"file-{index:05d}-{'x' * 40}.txt" for index in range(3000)]
    for name in reversed(names):
        (home / name).write_bytes(b"")
    threads = ManualThreads()
    shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, threads))
    formatted: list[str] = []

    def line(entry):
        formatted.append(entry.name)
        return entry.name.encode()

    downloads: list[FileDownload] = []
    shell.listing([], line).addCallback(downloads.append)
    threads.run_one()  # the names, read and sorted
    assert formatted == [] and len(downloads) == 1
    download = downloads[0]
    download.chunk_size = 20_000
    consumer = RecordingConsumer()
    done = download.send(consumer)
    download.pauseProducing()
    threads.run_one()
    first = len(formatted)
    assert 0 < first < 1000 and threads.pending == []  # one chunk's entries, then nothing while paused
    download.resumeProducing()
    threads.run_all()
    assert b"".join(consumer.chunks) == b"".join(name.encode() + b"\r\n" for name in names)
    assert len(consumer.chunks) > 5 and done.called and consumer.unregistered


def test_a_listing_stopped_by_the_client_formats_no_more(home):
    """ABOR or a lost data connection during a listing ends it: no more entries are stat-ed or formatted."""
    for index in range(2000):
        (home / f"f{index:04d}").write_bytes(b"")
    threads = ManualThreads()
    shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, threads))
    formatted: list[str] = []
    downloads: list[FileDownload] = []
    shell.listing([], lambda entry: formatted.append(entry.name) or entry.name.encode()).addCallback(downloads.append)
    threads.run_one()
    downloads[0].chunk_size = 1000
    done = downloads[0].send(RecordingConsumer())
    downloads[0].stopProducing()  # while the first chunk is in flight
    threads.run_all()
    assert 0 < len(formatted) < 2000
    assert failure_of(done).check(internet_error.ConnectionLost)


# -- uploads ---------------------------------------------------------------------------


def test_upload_writes_chunks_in_order_and_close_waits(home, result_of, run_in_thread):
    """Data written to the consumer lands in the file in order; close() fires after the last write."""
    shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, run_in_thread))
    writer = result_of(shell.openForWriting(["up.bin"]))
    assert verifyObject(twisted_ftp.IWriteFile, writer)
    consumer = result_of(writer.receive())
    for index in range(50):
        consumer.write(bytes([index]) * 1000)
    result_of(writer.close())
    assert (home / "up.bin").read_bytes() == b"".join(bytes([index]) * 1000 for index in range(50))


def test_upload_appends(shell, home, result_of):
    """openForWriting with append=True keeps the existing content (APPE)."""
    (home / "log").write_bytes(b"one\n")
    writer = result_of(shell.openForWriting(["log"], append=True))
    result_of(writer.receive()).write(b"two\n")
    result_of(writer.close())
    assert (home / "log").read_bytes() == b"one\ntwo\n"


def test_an_upload_empties_its_file_only_once_its_data_may_flow(shell, home, result_of):
    """Closed before begin() (its data connection refused): the file is as it was. An empty upload empties it."""
    (home / "kept").write_bytes(b"precious")
    refused = result_of(shell.openForWriting(["kept"]))
    result_of(refused.receive())
    result_of(refused.close())
    assert (home / "kept").read_bytes() == b"precious"
    empty = result_of(shell.openForWriting(["kept"]))
    result_of(empty.receive()).begin()
    result_of(empty.close())
    assert (home / "kept").read_bytes() == b""


def test_an_upload_that_fails_before_its_first_byte_keeps_the_file(shell, home, result_of):
    """QA, session 27: a cancelled upload (ABOR, a reset) that got no byte still emptied the file; one that got bytes
    keeps them (to be resumed)."""
    (home / "kept").write_bytes(b"precious")
    cancelled = result_of(shell.openForWriting(["kept"]))
    result_of(cancelled.receive()).begin()
    result_of(cancelled.close(failed=True))
    assert (home / "kept").read_bytes() == b"precious"
    cut = result_of(shell.openForWriting(["kept"]))
    result_of(cut.receive()).begin()
    cut.write(b"new")
    result_of(cut.close(failed=True))
    assert (home / "kept").read_bytes() == b"new"


def _prepared(file) -> PreparedUpload:
    """An upload of ``file`` as the filesystem opens one: nothing to cut, not created by the opening."""
    return PreparedUpload(file, "/unused", cut=False, created=False)


def test_upload_pauses_the_producer_when_the_disk_falls_behind(home):
    """Above high_water bytes waiting for the disk the producer is paused, below low_water resumed."""
    threads = ManualThreads()
    upload = FileUpload(JailedFilesystem(str(home), FULL_CONTROL, threads), _prepared(open(home / "f", "wb")), "/f")
    upload.high_water, upload.low_water = 10, 4
    producer = RecordingProducer()
    upload.registerProducer(producer, True)
    upload.write(b"123456")  # one write in flight
    upload.write(b"7890ab")  # queued: 12 bytes pending
    assert producer.events == ["pause"]
    assert len(threads.pending) == 1
    threads.run_one()  # 6 written, 6 pending: still above low water
    assert producer.events == ["pause"]
    threads.run_one()
    assert producer.events == ["pause", "resume"]
    closing = upload.close()
    threads.run_all()
    assert closing.called
    assert (home / "f").read_bytes() == b"1234567890ab"


class _FullDisk:
    closed = False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self.closed = True


def test_upload_write_error_stops_the_producer_and_fails_close(home, run_in_thread):
    """A failing write stops the data connection and close() fails with 452, after closing the file."""
    file = _FullDisk()
    upload = FileUpload(JailedFilesystem(str(home), FULL_CONTROL, run_in_thread), _prepared(file), "/f")
    producer = RecordingProducer()
    upload.registerProducer(producer, True)
    upload.write(b"data")
    assert producer.events == ["stop"]
    upload.write(b"more")  # ignored, never raises
    error = failure_of(upload.close()).value
    assert error.response().startswith("452 ")
    assert file.closed


class _FillsUp:
    """A file on a disk with room for ``room`` bytes."""

    closed = False

    def __init__(self, room: int):
        self.room = room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)

    def close(self):
        self.closed = True


def test_a_failed_upload_write_is_logged_with_the_reason_and_the_bytes_written(home, run_in_thread, log_lines):
    """A full disk is a warning in the server log (it was no line at all): the reason, and how far the upload got."""
    upload = FileUpload(JailedFilesystem(str(home), FULL_CONTROL, run_in_thread, log_as="ftp alice"), _prepared(_FillsUp(6)),
                        "/f")
    upload.write(b"1234")
    assert not upload.write_failed
    upload.write(b"5678")
    assert upload.write_failed
    assert failure_of(upload.close()).value.response().startswith("452 ")
    assert [line for line in log_lines if line.startswith("ftp alice:")] == [
        "ftp alice: writing /f failed after 4 bytes: No space left on device"
    ]


# -- the protocol ------------------------------------------------------------------------


class FakePortal:
    def __init__(self):
        self.logins: list[tuple] = []
        self.logouts = 0
        self.end_reasons: list[str] = []  # what each logout was told: the session-end's reason

    def login(self, credentials, mind, *interfaces):
        deferred = defer.Deferred()
        self.logins.append((credentials, mind, interfaces, deferred))
        return deferred

    def accept(self, index: int = -1) -> None:
        def logout(why=""):
            self.logouts += 1
            self.end_reasons.append(why)

        self.logins[index][3].callback((twisted_ftp.IFTPShell, object(), logout))


def _settings(**overrides) -> FTPServiceSettings:
    values = dict(
        id="ftp-unit",
        type="ftp",
        enabled=True,
        name="",
        address="127.0.0.1",
        port=2121,
        authentications=(),
        security_policy="DEFAULT-SECURITY-POLICY",
        idle_connection_timeout=300,
        maximum_concurrent_connections=10,
        banner="unit banner",
        passive_port_range=None,
        passive_address="",
    )
    values.update(overrides)
    return FTPServiceSettings(**values)


@pytest.fixture
def connection():
    """An FTP protocol on a StringTransport, with a fake portal and a fake clock."""
    reactor = MemoryReactorClock()
    portal = FakePortal()
    factory = FTPServiceFactory(_settings(), types.SimpleNamespace(portal=portal, reactor=reactor, policy_for=lambda settings: None))
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 2121), peerAddress=IPv4Address("TCP", "192.0.2.7", 5555)
    )
    protocol.makeConnection(transport)

    def send(line: bytes) -> list[bytes]:
        transport.clear()
        protocol.dataReceived(line + b"\r\n")
        reactor.advance(0)
        return transport.value().splitlines()

    return types.SimpleNamespace(
        protocol=protocol, transport=transport, portal=portal, reactor=reactor, send=send
    )


def test_greeting_is_the_banner(connection):
    """The first line is 220 with the configured banner."""
    assert connection.transport.value() == b"220 unit banner\r\n"


def test_login_sends_a_login_request_with_the_peer_address(connection):
    """USER/PASS go to the portal as a LoginRequest with the client's address and a SessionInfo mind."""
    assert connection.send(b"USER alice") == [b"331 Password required."]
    connection.send(b"PASS s3cret")
    credentials, mind, interfaces, _ = connection.portal.logins[0]
    assert credentials == LoginRequest("alice", "s3cret", "ftp-unit", "ftp", "192.0.2.7", tls=False)
    assert mind == SessionInfo("ftp-unit", "ftp", "192.0.2.7", tls=False)  # plain FTP: the audit events say so
    assert interfaces == (twisted_ftp.IFTPShell,)
    connection.transport.clear()
    connection.portal.accept()
    assert connection.transport.value() == b"230 User logged in, proceed\r\n"


@pytest.mark.parametrize("error", [UnauthorizedLogin("invalid-password"), RuntimeError("bug")])
def test_any_login_failure_is_a_plain_530(connection, error):
    """Whatever the reason, the client only reads "530 Login failed." and can try again."""
    connection.send(b"USER alice")
    connection.send(b"PASS wrong")
    connection.transport.clear()
    connection.portal.logins[0][3].errback(error)
    connection.reactor.advance(FAILED_LOGIN_DELAY - 0.01)
    assert connection.transport.value() == b""  # a guesser waits, as on SSH
    connection.reactor.advance(0.01)
    assert connection.transport.value() == b"530 Login failed.\r\n"
    assert connection.send(b"USER alice") == [b"331 Password required."]


def test_a_failed_login_is_answered_one_second_after_pass_however_long_the_check_took(connection):
    """The delay counts from PASS: a slow failure (a password hashed, a ban held back) is not answered later than a fast one."""
    connection.send(b"USER alice")
    connection.send(b"PASS wrong")
    connection.transport.clear()
    connection.reactor.advance(0.4)  # the check takes 0.4 s (hashing), an unknown user would take none
    connection.portal.logins[0][3].errback(UnauthorizedLogin("invalid-password"))
    connection.reactor.advance(FAILED_LOGIN_DELAY - 0.4 - 0.01)
    assert connection.transport.value() == b""
    connection.reactor.advance(0.01)
    assert connection.transport.value() == b"530 Login failed.\r\n"
    connection.transport.clear()
    connection.send(b"USER alice")
    connection.send(b"PASS wrong")
    connection.reactor.advance(1.5)  # the chain held a banned refusal back a second, and more
    connection.portal.logins[1][3].errback(UnauthorizedLogin("banned"))
    assert connection.transport.value().endswith(b"530 Login failed.\r\n")  # at once: not a second more


def test_quit_during_the_failed_login_delay_is_answered_at_once(connection):
    """The delay holds the 530, not the connection: QUIT sent meanwhile gets 221 and the connection closes."""
    connection.send(b"USER alice")
    connection.send(b"PASS wrong")
    connection.portal.logins[0][3].errback(UnauthorizedLogin("invalid-password"))
    assert connection.send(b"QUIT") == [b"221 Goodbye."]
    assert connection.transport.disconnecting


def test_non_utf8_username_reaches_the_chain_as_surrogates(connection):
    """Bytes that are not UTF-8 are passed on (as lone surrogates) for the chain to refuse."""
    connection.send(b"USER al\xffice")
    connection.send(b"PASS x")
    assert connection.portal.logins[0][0].username == "al\udcffice"


def test_logout_runs_when_the_connection_is_lost(connection):
    """The portal's logout runs once when the client goes away (Twisted alone never calls it)."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.portal.accept()
    connection.protocol.connectionLost(Failure(internet_error.ConnectionDone()))
    assert connection.portal.logouts == 1


def test_login_finishing_after_the_client_left_logs_out_at_once(connection):
    """A session whose client left during the login is ended as soon as the login completes."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.protocol.connectionLost(Failure(internet_error.ConnectionDone()))
    connection.portal.accept()
    assert connection.portal.logouts == 1
    assert connection.portal.end_reasons == ["connection-closed"]


def _quit(connection):
    connection.send(b"QUIT")


def _idle(connection):
    connection.reactor.advance(connection.protocol.timeOut)


def _stopping(connection):
    connection.protocol.shutting_down()


def _long_line(connection):
    connection.protocol.dataReceived(b"NOOP " + b"x" * (connection.protocol.MAX_LENGTH + 10) + b"\r\n")


@pytest.mark.parametrize(
    "ending, reason",
    [(_quit, "logout"), (_idle, "idle-timeout"), (_stopping, "shutdown"), (_long_line, "protocol-error")],
)
def test_the_session_end_says_why_the_server_closed_the_connection(connection, ending, reason):
    """QUIT, the idle timeout, a stop and a command line too long each give the session-end their own reason."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.portal.accept()
    ending(connection)
    connection.protocol.connectionLost(Failure(internet_error.ConnectionDone()))  # the close that follows
    assert connection.portal.end_reasons == [reason]


@pytest.mark.parametrize(
    "error, reason",
    [(internet_error.ConnectionDone(), "connection-closed"), (internet_error.ConnectionLost(), "connection-lost")],
)
def test_the_session_end_tells_a_client_that_closed_from_a_connection_that_broke(connection, error, reason):
    """Without QUIT: a clean close from the client is connection-closed, a reset or TLS error connection-lost."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.portal.accept()
    connection.protocol.connectionLost(Failure(error))
    assert connection.portal.end_reasons == [reason]


def test_user_after_login_is_refused(connection):
    """A logged-in session cannot switch user."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.portal.accept()
    assert connection.send(b"USER bob")[0].startswith(b"503 ")
    assert connection.send(b"PASS pw")[0].startswith(b"503 ")


def test_commands_with_wrong_arguments_get_501(connection):
    """Missing or extra arguments are 501, never a crash or a 451."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.portal.accept()
    assert connection.send(b"MKD")[0].startswith(b"501 ")
    assert connection.send(b"NOOP extra")[0].startswith(b"501 ")
    assert connection.send(b"NOOP ") == [b"200 Command OK"]
    assert connection.send(b"TYPE ")[0].startswith(b"501 ")


def test_idle_connection_gets_421(connection):
    """After idle_connection_timeout seconds without a command the server says 421 and closes."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.portal.accept()
    connection.reactor.advance(0)
    assert connection.transport.value().startswith(b"230 ")
    connection.reactor.advance(299)
    assert not connection.transport.disconnecting
    connection.reactor.advance(2)
    assert connection.transport.value().splitlines()[-1].startswith(b"421 ")
    assert connection.transport.disconnecting


def test_a_connection_that_does_not_log_in_is_closed_after_the_login_grace(connection):
    """Commands do not keep an unauthenticated connection open: 421 after LOGIN_GRACE_SECONDS, as on SSH."""
    for ignored in range(11):
        connection.reactor.advance(10)
        assert connection.send(b"NOOP")[0].startswith(b"200 ")
    assert not connection.transport.disconnecting
    connection.reactor.advance(LOGIN_GRACE_SECONDS - 110)
    assert connection.transport.value().splitlines()[-1].startswith(b"421 No login within 120 seconds")
    assert connection.transport.disconnecting


def test_a_logged_in_connection_has_no_login_deadline(connection):
    """The login deadline ends with the login: only the idle timeout applies then."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.portal.accept()
    connection.reactor.advance(LOGIN_GRACE_SECONDS + 1)
    assert not connection.transport.disconnecting
    assert connection.send(b"NOOP")[0].startswith(b"200 ")


def test_commands_sent_during_a_login_are_queued_in_order_and_bounded(connection):
    """While PASS is checked, later commands wait in order; at MAX_QUEUED_COMMANDS reading pauses.

    Reading resumes as soon as the queue is below the bound, also while a
    queued transfer is still running, so that its ABOR is read.
    """
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.transport.clear()
    noops = MAX_QUEUED_COMMANDS - 2
    connection.protocol.dataReceived(b"PASV\r\nRETR f.txt\r\n" + b"NOOP\r\n" * noops)
    assert connection.transport.value() == b""
    assert connection.transport.producerState == "paused"
    connection.portal.accept()
    replies = connection.transport.value().split(b"\r\n")
    assert replies[0].startswith(b"230 ") and replies[1].startswith(b"227 ") and replies[2:] == [b""]
    assert connection.transport.producerState == "producing"  # RETR waits for its data connection
    answers = connection.send(b"ABOR")
    assert answers == [b"425 Can't open data connection.", b"226 Abort successful"] + [b"200 Command OK"] * noops


def test_lines_may_end_in_a_bare_lf_and_replies_end_in_crlf(connection):
    """Scripts (printf, nc) end commands with LF only: they are answered as CRLF lines are, with CRLF replies."""
    connection.transport.clear()
    connection.protocol.dataReceived(b"NOOP\nUSER alice\r\nSTOR a\rb\n")
    assert connection.transport.value().split(b"\r\n") == [
        b"200 Command OK",
        b"331 Password required.",
        b"503 Incorrect sequence of commands: PASS required after USER",
        b"",
    ]


@pytest.mark.parametrize(
    "prefix",
    [
        b"\xff\xf4\xff\xf2",  # IAC IP IAC DM: RFC 959's interrupt and synch, the urgent byte kept inline
        b"\xff\xf4\xf2",  # BSD ftp's urgent IAC lost on the way (a proxy)
        b"\xff\xf4\xff",  # the DM lost
        b"\xff\xfb\x01\xff\xfd\x03",  # a Telnet client's option negotiation: IAC WILL ECHO, IAC DO SUPPRESS-GO-AHEAD
    ],
)
@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_telnet_commands_before_a_command_are_skipped(connection, prefix, ending):
    """Telnet commands before a command (IAC IP IAC DM before ABOR, option negotiation) are not part of it."""
    connection.transport.clear()
    connection.protocol.dataReceived(prefix + b"NOOP" + ending + prefix + b"USER alice" + ending)
    assert connection.transport.value().split(b"\r\n") == [b"200 Command OK", b"331 Password required.", b""]


def test_telnet_commands_are_skipped_only_at_the_start_of_a_line():
    """Only the bytes before the command go; its argument keeps every byte (byte 255, sent doubled, once)."""
    assert strip_telnet_commands(b"\xff\xf4\xff\xf2ABOR") == b"ABOR"
    assert strip_telnet_commands(b"\xff\xfdAABOR") == b"ABOR"  # IAC DO option 'A'
    assert strip_telnet_commands(b"MKD \xff\xf4name") == b"MKD \xff\xf4name"
    assert strip_telnet_commands(b"\xff") == b""
    assert strip_telnet_commands(b"NOOP") == b"NOOP"
    assert strip_telnet_commands(b"STOR caf\xff\xff.txt") == b"STOR caf\xff.txt"  # IAC IAC is byte 255 (RFC 854)
    assert strip_telnet_commands(b"RETR \xff\xff\xff\xff") == b"RETR \xff\xff"


def test_abor_behind_telnet_commands_is_read_while_a_command_runs(connection):
    """ABOR behind IAC IP IAC DM, sent while the login is checked, is ABOR: answered right after the login."""
    connection.send(b"USER alice")
    connection.send(b"PASS pw")
    connection.transport.clear()
    connection.protocol.dataReceived(b"\xff\xf4\xff\xf2ABOR\r\n")
    assert connection.transport.value() == b""
    connection.portal.accept()
    assert connection.transport.value().split(b"\r\n") == [b"230 User logged in, proceed", b"226 Abort successful", b""]


class _SocketTransport(StringTransport):
    def __init__(self, handle):
        super().__init__()
        self._handle = handle

    def getHandle(self):
        return self._handle


def test_urgent_data_is_kept_inline_on_the_control_socket_under_tls_and_wrappers():
    """SO_OOBINLINE is set on the TCP socket found under the TLS layer and the connection guard (ftplib's ABOR)."""
    control, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with control, client:
        guard = types.SimpleNamespace(transport=_SocketTransport(control))  # a ProtocolWrapper: no handle of its own
        tls = types.SimpleNamespace(getHandle=lambda: object(), transport=guard)  # TLSMemoryBIOProtocol's handle is not a socket
        assert keep_urgent_data_inline(tls)
        assert control.getsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE) == 1
    assert not keep_urgent_data_inline(StringTransport())


def test_over_long_line_gets_500_and_is_closed(connection):
    """A command line longer than the limit is answered with 500 and the connection closed."""
    connection.transport.clear()
    connection.protocol.dataReceived(b"USER " + b"a" * 20_000)
    assert connection.transport.value().startswith(b"500 ")
    assert connection.transport.disconnecting


def test_opts_utf8_and_feat(connection):
    """OPTS UTF8 ON answers 200, also before login, and FEAT lists UTF8."""
    assert connection.send(b"OPTS UTF8 ON")[0].startswith(b"200 ")
    assert b" UTF8" in connection.send(b"FEAT")


def _logged_in(settings: FTPServiceSettings):
    reactor = MemoryReactorClock()
    portal = FakePortal()
    factory = FTPServiceFactory(settings, types.SimpleNamespace(portal=portal, reactor=reactor, policy_for=lambda settings: None))
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "10.0.0.5", 2121), peerAddress=IPv4Address("TCP", "192.0.2.7", 5555)
    )
    protocol.makeConnection(transport)
    for line in (b"USER alice", b"PASS pw"):
        protocol.dataReceived(line + b"\r\n")
        reactor.advance(0)
    portal.accept()
    reactor.advance(0)
    transport.clear()
    return protocol, transport, reactor


def _stat_session(home, count: int):
    """A logged-in FTP protocol whose shell lists ``home`` (``count`` files) with threads run by the test."""
    names = [f"file-{index:05d}-{'x' * 40}.txt" for index in range(count)]
    for name in names:
        (home / name).write_bytes(b"")
    protocol, transport, reactor = _logged_in(_settings())
    threads = ManualThreads()
    protocol.shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, threads), ("alice", "staff"))
    return protocol, transport, threads, names


def test_stat_of_a_folder_streams_its_lines_as_the_control_connection_takes_them(home):
    """STAT PATH: the 213 lines go out a chunk per thread trip, none while the control connection's buffer is full."""
    protocol, transport, threads, names = _stat_session(home, 3000)
    protocol.dataReceived(b"STAT /\r\n")
    threads.run_one()  # the names, read and sorted
    assert transport.value() == b"213-Status of /:\r\n" and transport.streaming
    transport.producer.pauseProducing()  # the client does not read: the socket's buffer is full
    threads.run_one()
    first = transport.value().split(b"\r\n")[1:-1]
    assert 0 < len(first) < 1000 and threads.pending == []  # one chunk, then nothing while paused
    transport.producer.resumeProducing()
    threads.run_all()
    lines = transport.value().split(b"\r\n")
    assert lines[0] == b"213-Status of /:" and lines[-2:] == [b"213 End of status.", b""]
    listed = lines[1:-2]
    assert len(listed) == len(names) and all(line.startswith(b" -rw") for line in listed)
    assert [line.rsplit(b" ", 1)[1].decode() for line in listed] == names
    assert transport.producer is None and not transport.disconnecting


def test_a_stat_reply_being_read_keeps_the_session_alive_and_one_not_read_times_out(home):
    """idle_connection_timeout (300 s) counts from the last chunk the client took, as during a transfer."""
    protocol, transport, threads, _ = _stat_session(home, 3000)
    reactor = protocol.factory.reactor
    protocol.dataReceived(b"STAT /\r\n")
    threads.run_one()
    transport.producer.pauseProducing()
    for _ in range(2):
        reactor.advance(200)
        threads.run_one()  # a chunk goes out 200 s after the last one
        transport.producer.resumeProducing()
        transport.producer.pauseProducing()
    reactor.advance(200)
    assert not transport.disconnecting  # 400 s since STAT, never 300 s without a chunk
    reactor.advance(101)
    assert transport.value().splitlines()[-1].startswith(b"421 ") and transport.disconnecting


def test_stat_of_a_folder_ended_by_the_client_leaving_logs_no_error(home):
    """The control connection lost during STAT's listing stops it quietly; a local error ends the reply with 213."""
    with captured_logs() as events:
        protocol, transport, threads, _ = _stat_session(home, 2000)
        protocol.dataReceived(b"STAT /\r\n")
        threads.run_one()
        transport.producer.stopProducing()  # what a TCP transport does when the connection is lost
        threads.run_all()
        assert not [event for event in events if "log_failure" in event]
        assert b"213 End" not in transport.value()

        protocol, transport, threads, _ = _stat_session(home, 0)

        def failing_line(entry):
            raise OSError(5, "Input/output error")  # a disk error while the listing's entries are read

        protocol._list_lines = lambda: failing_line
        protocol.dataReceived(b"STAT /\r\n")
        threads.run_all()
        assert transport.value().split(b"\r\n")[-2] == b"213 End of status (the listing is incomplete: local error in processing)."
        assert [event for event in events if "log_failure" in event]


def test_stat_of_a_folder_whose_client_left_before_it_was_opened_ends_quietly(home, log_lines):
    """The connection lost while the folder is opened in a thread (transport None by then): no critical error, nothing sent."""
    protocol, transport, threads, _ = _stat_session(home, 10)
    protocol.dataReceived(b"STAT /\r\n")
    protocol.connectionLost(Failure(internet_error.ConnectionLost()))
    threads.run_all()
    assert protocol.transport is None and b"213" not in transport.value()
    assert not [line for line in log_lines if "failed unexpectedly" in line or "Traceback" in line], log_lines


def test_a_rename_refused_at_rnfr_is_logged_as_the_refused_rename(home, run_in_thread, log_lines):
    """RNFR ends the rename when refused: the log says so in the words SFTP's rename uses."""
    (home / "top.txt").write_bytes(b"t")
    reader = JailedFTPShell(JailedFilesystem(str(home), frozenset({Permission.READ}), run_in_thread, log_as="ftp reader"))
    assert failure_of(reader.checkRenameSource(["top.txt"])).check(twisted_ftp.PermissionDeniedError)
    alice = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, run_in_thread, log_as="ftp alice"))
    assert failure_of(alice.checkRenameSource(["missing"])).check(twisted_ftp.FileNotFoundError)
    assert alice.checkRenameSource(["top.txt"]).called  # accepted: nothing logged until RNTO
    assert log_lines == [
        "ftp reader: rename /top.txt refused: permission denied: allow-rename is not granted",
        "ftp alice: rename /missing refused: no such file or folder",
    ]


def test_pasv_announces_passive_address_and_listens_in_the_range():
    """PASV names passive_address and a port from passive_port_range, listening on the local address."""
    protocol, transport, reactor = _logged_in(_settings(passive_address="203.0.113.9", passive_port_range=(50000, 50010)))
    protocol.dataReceived(b"PASV\r\n")
    reactor.advance(0)
    assert transport.value() == b"227 Entering Passive Mode (203,0,113,9,195,80).\r\n"
    port, factory, backlog, interface = reactor.tcpServers[-1]
    assert (port, interface) == (50000, "10.0.0.5")


def test_pasv_defaults_to_the_address_the_client_connected_to():
    """Without passive_address, PASV names the server address of the control connection."""
    protocol, transport, reactor = _logged_in(_settings())
    protocol.dataReceived(b"PASV\r\n")
    reactor.advance(0)
    assert transport.value().startswith(b"227 Entering Passive Mode (10,0,0,5,")


def test_unanswered_pasv_is_closed_quietly_and_the_transfer_gets_425():
    """A passive port nobody connects to is closed after the data timeout, with no unsolicited reply; LIST then is 425."""
    protocol, transport, reactor = _logged_in(_settings())
    protocol.dataReceived(b"PASV\r\n")
    reactor.advance(0)
    transport.clear()
    protocol.dataReceived(b"NOOP\r\n")  # answered at once, before any data connection
    assert transport.value().startswith(b"200 ")
    transport.clear()
    reactor.advance(protocol.dtpTimeout + 1)
    assert transport.value() == b""
    assert protocol.dtpFactory is None and protocol.dtpPort is None
    protocol.dataReceived(b"LIST\r\n")
    assert transport.value().startswith(b"425 ")


def test_a_transfer_sent_before_the_passive_connection_waits_for_it_then_gets_425_on_timeout():
    """RETR right after PASV waits for the client's data connection; if none comes, 425 when the data timeout ends."""
    protocol, transport, reactor = _logged_in(_settings())
    protocol.dataReceived(b"PASV\r\n")
    reactor.advance(0)
    transport.clear()
    protocol.dataReceived(b"RETR file.txt\r\n")
    assert transport.value() == b""
    reactor.advance(protocol.dtpTimeout + 1)
    assert transport.value().startswith(b"425 Can't open data connection.")
    assert protocol.dtpFactory is None and protocol.dtpPort is None


def test_data_connection_from_another_address_is_refused():
    """Only the control connection's address may open the passive data connection."""
    protocol, transport, reactor = _logged_in(_settings())
    protocol.dataReceived(b"PASV\r\n")
    reactor.advance(0)
    factory = reactor.tcpServers[-1][1]
    assert factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 4000)) is None
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 4000)) is not None


def test_size_needs_read_or_list(home, run_in_thread):
    """SIZE (stat) works with allow-read alone, as clients ask it before RETR, and fails with neither read nor list."""
    (home / "f.txt").write_bytes(b"xyz")
    reader = JailedFTPShell(JailedFilesystem(str(home), frozenset({Permission.READ}), run_in_thread))
    results = []
    reader.stat(["f.txt"], ("size",)).addCallback(results.append)
    assert results == [[3]]
    writer = JailedFTPShell(JailedFilesystem(str(home), frozenset({Permission.WRITE}), run_in_thread))
    assert isinstance(failure_of(writer.stat(["f.txt"], ("size",))).value, twisted_ftp.PermissionDeniedError)


def test_mlsx_facts_follow_the_permissions_and_the_chosen_facts():
    """RFC 3659 facts: files and folders get the perm letters their group's permissions allow."""
    file_stat = os.stat_result((0o100644, 0, 0, 1, 0, 0, 42, 0, 1_700_000_123, 0))
    folder_stat = os.stat_result((0o040755, 0, 0, 2, 0, 0, 4096, 0, 1_700_000_123, 0))
    assert mlsx_facts(file_stat, FULL_CONTROL) == "type=file;size=42;modify=20231114221523;perm=adfrw;"
    assert mlsx_facts(folder_stat, FULL_CONTROL) == "type=dir;modify=20231114221523;perm=cdeflmp;"
    read_only = frozenset({Permission.READ, Permission.LIST})
    assert mlsx_facts(file_stat, read_only, ("perm",)) == "perm=r;"
    assert mlsx_facts(folder_stat, read_only, ("type", "perm")) == "type=dir;perm=el;"
    assert mlsx_facts(folder_stat, frozenset(), ("size",)) == ""
    assert mlsx_facts(folder_stat, FULL_CONTROL, ("perm",), home=True) == "perm=celmp;"


def test_mlsx_facts_of_a_symlink_say_so_with_its_target_when_a_fact_can_carry_it():
    """RFC 3659's ``OS.unix=slink:target`` (FileZilla, lftp), or ``OS.unix=symlink`` for a target with ;, a space or a control character."""
    link_stat = os.stat_result((0o120777, 0, 0, 1, 0, 0, 4, 0, 1_700_000_123, 0))
    assert mlsx_facts(link_stat, FULL_CONTROL, link="docs") == "type=OS.unix=slink:docs;modify=20231114221523;perm=df;"
    assert mlsx_facts(link_stat, frozenset({Permission.LIST}), link="..") == "type=OS.unix=slink:..;modify=20231114221523;perm=;"
    for awkward in ("a;b", "my docs", "evil\r\nline", ""):
        assert mlsx_facts(link_stat, FULL_CONTROL, ("type",), link=awkward) == "type=OS.unix=symlink;"
    assert mlsx_facts(link_stat, FULL_CONTROL, ("type",), link="caf\u00e9") == "type=OS.unix=slink:caf\u00e9;"


def test_mlst_of_the_home_folder_offers_no_delete_or_rename(home, run_in_thread):
    """The session's / can be neither deleted nor renamed, so its perm fact has no d or f; a subfolder's has both."""
    (home / "sub").mkdir()
    shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, run_in_thread))
    results = []
    shell.facts([], ("perm",)).addCallback(results.append)
    shell.facts(["sub"], ("perm",)).addCallback(results.append)
    assert results == ["perm=celmp;", "perm=cdeflmp;"]


@pytest.mark.parametrize(
    "mode, modified",
    [(0o100644, 1_700_000_123), (0o040755, 86_400 * 3), (0o100600, None)],
)
def test_list_lines_are_twisted_s_ls_format(mode, modified):
    """LIST lines are byte for byte what Twisted's DTP wrote, also for this year's files (time, not year)."""
    modified = time.time() - 3600 if modified is None else modified
    result = os.stat_result((mode, 0, 0, 3, 0, 0, 1234, 0, modified, 0))
    expected = twisted_ftp.DTP()._formatOneListResponse(
        b"name.txt", 1234, bool(mode & 0o040000), filepath.Permissions(mode & 0o777), 3, modified, "alice", "demo-users"
    )
    assert list_line("name.txt", result, "alice", "demo-users", time.gmtime().tm_year) == expected


def test_a_symlink_s_list_line_is_ls_s():
    """``lrwxrwxrwx ... name -> target``, as ``ls -l`` and vsftpd show a link, so clients do not go through it."""
    result = os.stat_result((0o120777, 0, 0, 1, 0, 0, 2, 0, 1_700_000_123, 0))
    assert list_line("up", result, "alice", "users", 2023, "..") == (
        b"lrwxrwxrwx   1 alice     users                   2 Nov 14 22:15 up -> .."
    )
    assert list_line("odd\n", result, "alice", "users", 2023, "t\x1b").endswith(b" odd? -> t?")


def test_listings_show_control_characters_as_question_marks():
    """A name with a line break or an escape cannot forge a listing line or reach the client's terminal."""
    assert listing_name("evil\r\n-rw-r--r-- 1 root root 9 Jan 01 00:00 PAYROLL\x1b[31m\x7f") == (
        b"evil??-rw-r--r-- 1 root root 9 Jan 01 00:00 PAYROLL?[31m?"
    )
    assert listing_name("caf\u00e9 r\u00e9sum\u00e9.txt") == "caf\u00e9 r\u00e9sum\u00e9.txt".encode()


def test_listing_lines_are_made_in_the_thread_pool(home):
    """Reading the folder and formatting every line both happen in the thread pool, never on the reactor."""
    for index in range(5):
        (home / f"f{index}.txt").write_bytes(b"x" * index)
    threads = ManualThreads()
    shell = JailedFTPShell(JailedFilesystem(str(home), FULL_CONTROL, threads))
    in_thread = []

    def line(entry):
        in_thread.append(bool(threads.running))
        return entry.name.encode()

    running = threads.run_one

    def run_one():
        threads.running = True
        try:
            running()
        finally:
            threads.running = False

    threads.running, threads.run_one = False, run_one
    results = []
    read_listing(shell, [], line, "f[1-3]*").addCallback(results.append)
    while threads.pending:
        threads.run_one()
    assert results == [b"f1.txt\r\nf2.txt\r\nf3.txt\r\n"]
    assert in_thread == [True] * 3  # only the names the glob matches are formatted


def test_allo_is_a_no_op_after_login():
    """ALLO (with or without a size) is 202, as RFC 1123 allows: older clients send it before STOR."""
    protocol, transport, reactor = _logged_in(_settings())
    for line in (b"ALLO 100", b"ALLO 100 R 10", b"ALLO"):
        transport.clear()
        protocol.dataReceived(line + b"\r\n")
        reactor.advance(0)
        assert transport.value().startswith(b"202 ")
