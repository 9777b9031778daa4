"""The jail: client paths stay inside the home folder and permissions are enforced (SPEC §4)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from sftpauth.filesystem import (
    InvalidName,
    InvalidPath,
    JailedFilesystem,
    Listed,
    OffsetPastEnd,
    OutsideJail,
    PreparedUpload,
    attribute_change,
    check_new_name,
    disk_bytes,
    printable,
    resolve,
    virtual_path,
)
from sftpauth.permissions import FULL_CONTROL, Permission, PermissionDenied

# -- virtual_path --------------------------------------------------------------------


@pytest.mark.parametrize(
    "client_path, cwd, expected",
    [
        ("", "/", "/"),
        (".", "/", "/"),
        ("..", "/", "/"),
        ("../../..", "/", "/"),
        ("/..", "/", "/"),
        ("../../etc/passwd", "/", "/etc/passwd"),
        ("/../../etc/passwd", "/docs", "/etc/passwd"),
        ("a/b/../../../c", "/", "/c"),
        ("file.txt", "/docs", "/docs/file.txt"),
        ("../file.txt", "/docs/sub", "/docs/file.txt"),
        ("/abs/name", "/docs", "/abs/name"),
        ("//double//slashes/", "/", "/double/slashes"),
        ("./x/./y", "/", "/x/y"),
        (b"bytes/name", "/", "/bytes/name"),
        ("caf\u00e9", "/", "/caf\u00e9"),
    ],
)
def test_virtual_path_clamps_at_the_session_root(client_path, cwd, expected):
    """``..`` stops at ``/`` and absolute names are taken inside the session root."""
    assert virtual_path(client_path, cwd) == expected


@pytest.mark.parametrize(
    "client_path",
    [
        "a\0b",
        b"a\0b",
        "\0",
        "x" * 256,
        "ok/" + "x" * 256 + "/ok",
        "\u00e9" * 128,  # 256 bytes in UTF-8
        "a/" * 2100,  # 4200 bytes
        "/" + "b" * 4096,
        "caf\ud800",  # a surrogate that stands for no byte
        "/" + "\xe9" * 128 + "/" + "\udce9" * 128,  # 256 escapes: 256 bytes on disk
    ],
    ids=[
        "NUL",
        "NUL-bytes",
        "only-NUL",
        "256-byte-name",
        "256-byte-segment",
        "256-byte-multibyte-name",
        "path-over-4096",
        "path-4097",
        "lone-surrogate",
        "256-byte-latin1-name",
    ],
)
def test_virtual_path_refuses_impossible_names(client_path):
    """NUL bytes, over-long names or paths (counted in bytes on disk) and surrogates standing for no byte are InvalidPath."""
    with pytest.raises(InvalidPath):
        virtual_path(client_path)


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/a\nb", "a line break"),
        ("/a\rb", "a line break"),
        ("/x\x1b[31mred", "a control character (U+001B)"),
        ("/bell\x07", "a control character (U+0007)"),
        ("/tab\there", "a control character (U+0009)"),
        ("/del\x7f", "a control character (U+007F)"),
        ("/folder/\x01start", "a control character (U+0001)"),
    ],
)
def test_new_names_with_control_characters_are_refused(path, reason):
    """A name to be created with a C0 control character or DEL is refused, saying which character."""
    with pytest.raises(InvalidName) as refused:
        check_new_name(path)
    assert str(refused.value) == f"the name contains {reason}"
    assert isinstance(refused.value, InvalidPath)  # FTP already answers those with 553


@pytest.mark.parametrize("path", ["/plain.txt", "/caf\u00e9 \u6587\u4ef6 \u2713.txt", "/a\nb/inside", "/sp ace/", "/~tilde"])
def test_new_names_without_control_characters_are_accepted(path):
    """Only the name being created counts: its parent folders may have any name that already exists."""
    check_new_name(path)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"caf\xe9.txt", b"\xc3", b"\xe9t\xe9/x\xe9"])
def test_bytes_that_are_not_utf8_name_the_file_on_disk(raw):
    """Non-UTF-8 bytes become surrogate escapes (as os.scandir gives such names): the same bytes on disk."""
    path = virtual_path(raw)
    assert disk_bytes(path) == b"/" + raw
    assert virtual_path(raw.decode("utf-8", "surrogateescape")) == path  # as a listing gives it back
    with pytest.raises(InvalidName) as refused:
        check_new_name(path)
    assert str(refused.value) == "the name is not valid UTF-8"


def test_a_good_name_in_a_folder_that_is_not_utf8_may_be_created():
    """Only the new name must be UTF-8: files may be put in an existing folder with a Latin-1 name."""
    check_new_name(virtual_path(b"caf\xe9/new.txt"))


def test_virtual_path_accepts_the_longest_allowed_name():
    """A 255-byte name and a 4096-byte path are still valid."""
    assert virtual_path("x" * 255) == "/" + "x" * 255
    long_path = "/".join(["y" * 255] * 16)  # 16 * 256 - 1 = 4095 bytes
    assert virtual_path(long_path) == "/" + long_path


# -- resolve -------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    """A real home folder with files, a sub-folder and symlinks in and out."""
    home = tmp_path / "home"
    (home / "docs" / "deep").mkdir(parents=True)
    (home / "docs" / "report.txt").write_text("report", encoding="utf-8")
    (home / "a.txt").write_text("a", encoding="utf-8")
    (home / "empty").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret", encoding="utf-8")
    (tmp_path / "home-sibling").mkdir()  # shares the prefix "home"
    os.symlink("/etc", home / "link")
    os.symlink("docs", home / "inside-link")
    os.symlink(str(home / "docs" / "report.txt"), home / "absolute-inside-link")
    os.symlink("../outside", home / "hop1")
    os.symlink("hop1", home / "hop2")
    os.symlink("inside-link", home / "chain-inside")
    os.symlink("../home-sibling", home / "sibling")
    os.symlink(str(outside / "secret.txt"), home / "docs" / "deep" / "leak.txt")
    os.symlink("..", home / "docs" / "up")
    os.symlink("../../..", home / "docs" / "far-up")
    return os.path.realpath(home)


def test_resolve_maps_into_the_home_folder(root):
    """A client path resolves to the matching real path under the home folder."""
    assert resolve(root, "/") == root
    assert resolve(root, "..") == root
    assert resolve(root, "/docs/report.txt") == os.path.join(root, "docs", "report.txt")
    assert resolve(root, "report.txt", cwd="/docs") == os.path.join(root, "docs", "report.txt")
    assert resolve(root, "/../../docs/../a.txt") == os.path.join(root, "a.txt")
    assert resolve(root, "/etc/passwd") == os.path.join(root, "etc", "passwd")


@pytest.mark.parametrize(
    "client_path",
    ["link", "link/passwd", "/link/passwd", "docs/../link/shadow", "hop1", "hop2", "hop2/secret.txt",
     "sibling", "docs/deep/leak.txt", "docs/far-up", "docs/far-up/outside/secret.txt"],
)
def test_symlinks_leading_outside_are_refused(root, client_path):
    """A symlink (or chain of them) whose target is outside the home is OutsideJail."""
    with pytest.raises(OutsideJail) as caught:
        resolve(root, client_path)
    # The client is told about its own (virtual) path only, never the real one.
    assert str(caught.value) == f"{virtual_path(client_path)}: no such file or folder"
    assert root not in str(caught.value)


@pytest.mark.parametrize(
    "client_path, expected",
    [
        ("inside-link", "docs"),
        ("inside-link/report.txt", "docs/report.txt"),
        ("chain-inside/deep", "docs/deep"),
        ("absolute-inside-link", "docs/report.txt"),
        ("docs/up", ""),
        ("docs/up/a.txt", "a.txt"),
    ],
)
def test_symlinks_staying_inside_resolve(root, client_path, expected):
    """A symlink whose target is inside the home resolves to that target."""
    assert resolve(root, client_path) == os.path.join(root, expected).rstrip("/")


def _walk_names(root: str) -> list[str]:
    """Every name in the fixture's tree (links too, not followed), plus names that are not there."""
    found = ["missing", "missing/deeper", "a.txt/under-a-file", "docs/report.txt/x"]
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            found.append(os.path.relpath(os.path.join(folder, name), root))
    return found


def test_resolve_gives_what_realpath_gives(root):
    """Resolving from the home folder down is realpath of the whole path: each name alone, and after each link."""
    names = _walk_names(root)
    paths = names + [f"{first}/{second}" for first in names for second in ("report.txt", "deep", "secret.txt", "..", "x")]
    compared = 0
    for client_path in paths:
        virtual = virtual_path(client_path)
        expected = os.path.realpath(os.path.join(root, virtual.lstrip("/")))
        inside = expected == root or expected.startswith(root + os.sep)
        if inside:
            assert resolve(root, client_path) == expected, client_path
        else:
            with pytest.raises(OutsideJail):
                resolve(root, client_path)
        compared += 1
    assert compared > 100


def test_resolve_does_not_examine_the_home_folder_s_own_folders(root, monkeypatch):
    """The home folder is a real path already: only the names below it are looked at (no link among them)."""
    examined = []
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda path, *args, **kwargs: examined.append(path) or real_lstat(path, *args, **kwargs))
    assert resolve(root, "/docs/deep") == os.path.join(root, "docs", "deep")
    assert examined == [os.path.join(root, "docs"), os.path.join(root, "docs", "deep")]
    examined.clear()
    assert resolve(root, "/") == root and examined == []


def test_resolve_refuses_invalid_paths(root):
    """resolve applies the same input checks as virtual_path."""
    with pytest.raises(InvalidPath):
        resolve(root, "\udb00")
    with pytest.raises(InvalidPath):
        resolve(root, "a\0/../b")


# -- JailedFilesystem ----------------------------------------------------------------


@pytest.fixture
def make_fs(root, run_in_thread):
    def make(permissions=FULL_CONTROL):
        return JailedFilesystem(root, frozenset(permissions), run_in_thread)

    return make


def test_jailed_filesystem_uses_the_real_home_path(tmp_path, run_in_thread):
    """A home folder given through a symlink is jailed at its real path."""
    real = tmp_path / "real-home"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    fs = JailedFilesystem(str(tmp_path / "alias"), FULL_CONTROL, run_in_thread)
    assert fs.root == os.path.realpath(real)
    assert fs.resolve("/x") == os.path.join(os.path.realpath(real), "x")


def _close(handle):
    if isinstance(handle, int):
        os.close(handle)
    elif isinstance(handle, PreparedUpload):
        handle.file.close()
    elif hasattr(handle, "close"):
        handle.close()


def test_each_change_and_each_refusal_is_one_log_line_and_reads_none(root, run_in_thread, result_of, log_lines):
    """FTP and SFTP changes are logged by the jail, in the same words: what, where, and why it was refused."""
    fs = JailedFilesystem(root, FULL_CONTROL, run_in_thread, log_as="ftp alice")
    result_of(fs.make_directory("new"))
    result_of(fs.rename("new", "/newer/"))
    result_of(fs.remove_directory("/newer"))
    _close(result_of(fs.open_for_writing("/up.txt")))
    _close(result_of(fs.open_for_writing("/up.txt", append=True)))
    _close(result_of(fs.open_for_writing("report.txt", cwd="/docs", offset=2)))
    _close(result_of(fs.open_file("/up.txt", os.O_WRONLY)))
    result_of(fs.set_attributes("/up.txt", size=0, times=(1000.0, 1000.0)))
    result_of(fs.set_times("/up.txt", 1000.0, 1000.0))
    result_of(fs.set_attributes("/up.txt"))
    result_of(fs.remove_file("/up.txt"))
    for refused in (
        lambda: fs.remove_file("/missing.txt"),
        lambda: fs.make_directory("/docs"),
        lambda: fs.rename("/docs", "/docs/deep/docs"),
        lambda: fs.open_file("/a.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
        lambda: fs.open_for_writing("/bad\nname"),
        lambda: fs.remove_directory("/docs"),
        lambda: fs.remove_file("/link"),
        lambda: fs.open_for_writing("/a.txt", offset=99),
        lambda: JailedFilesystem(root, frozenset({Permission.READ}), run_in_thread, log_as="sftp reader").set_attributes("/a.txt"),
    ):
        with pytest.raises((OSError, InvalidPath, OutsideJail, PermissionDenied, OffsetPastEnd)):
            result_of(refused())
    _close(result_of(fs.open_for_reading("/a.txt")))
    _close(result_of(fs.open_file("/a.txt", os.O_RDONLY)))
    result_of(fs.stat("/a.txt"))
    result_of(fs.list_directory("/"))
    assert log_lines == [
        "ftp alice: make folder /new",
        "ftp alice: rename /new -> /newer",
        "ftp alice: remove folder /newer",
        "ftp alice: upload to /up.txt",
        "ftp alice: append to /up.txt",
        "ftp alice: upload from byte 2 to /docs/report.txt",
        "ftp alice: open for writing /up.txt",
        "ftp alice: truncate to 0 bytes and set times /up.txt",
        "ftp alice: set times /up.txt",
        "ftp alice: set permissions or owner (ignored) /up.txt",
        "ftp alice: remove /up.txt",
        "ftp alice: remove /missing.txt refused: no such file or folder",
        "ftp alice: make folder /docs refused: the file or folder already exists",
        "ftp alice: rename /docs -> /docs/deep/docs refused: a folder cannot be moved into itself",
        "ftp alice: open for writing /a.txt refused: the file or folder already exists",
        "ftp alice: upload to /bad\\nname refused: file name not allowed: the name contains a line break",
        "ftp alice: remove folder /docs refused: the folder is not empty",
        "ftp alice: remove /link refused: no such file or folder",
        "ftp alice: upload from byte 99 to /a.txt refused: the offset 99 is past the end of the file (1 bytes)",
        "sftp reader: set permissions or owner (ignored) /a.txt refused: permission denied: allow-write is not granted",
    ]
    assert not any(root in line for line in log_lines)  # the session's paths, never the server's


def test_log_lines_escape_what_a_terminal_would_act_on_and_show_bytes_that_are_not_utf8():
    assert printable("caf\udce9 \n\x1b[31m") == "caf\\xe9 \\n\\x1b[31m"
    assert attribute_change(1, None) == "truncate to 1 byte" and attribute_change(0, (1.0, 2.0)) == "truncate to 0 bytes and set times"


# Each operation, the permission it needs, and what it must have done on success.
OPERATIONS = {
    "read": (Permission.READ, lambda fs: fs.open_for_reading("/a.txt"), None),
    "open-read": (Permission.READ, lambda fs: fs.open_file("/a.txt", os.O_RDONLY), None),
    "list": (Permission.LIST, lambda fs: fs.list_directory("/docs"), None),
    "write": (Permission.WRITE, lambda fs: fs.open_for_writing("/new.txt"), "new.txt"),
    "append": (Permission.WRITE, lambda fs: fs.open_for_writing("/a.txt", append=True), None),
    "open-write": (Permission.WRITE, lambda fs: fs.open_file("/new.txt", os.O_WRONLY | os.O_CREAT), "new.txt"),
    "set-times": (Permission.WRITE, lambda fs: fs.set_times("/a.txt", 1000.0, 1000.0), None),
    "truncate": (Permission.WRITE, lambda fs: fs.set_attributes("/a.txt", size=0), None),
    "create-folder": (Permission.CREATE_FOLDER, lambda fs: fs.make_directory("/newdir"), "newdir"),
    "rename": (Permission.RENAME, lambda fs: fs.rename("/a.txt", "/b.txt"), "b.txt"),
    "delete-file": (Permission.DELETE_FILE, lambda fs: fs.remove_file("/a.txt"), "-a.txt"),
    "delete-folder": (Permission.DELETE_FOLDER, lambda fs: fs.remove_directory("/empty"), "-empty"),
}


def _snapshot(root):
    return sorted(os.listdir(root)), os.stat(os.path.join(root, "a.txt")).st_mtime


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_operation_needs_its_permission(make_fs, root, result_of, name):
    """Without its permission an operation is PermissionDenied and changes nothing."""
    permission, operation, _ = OPERATIONS[name]
    fs = make_fs(FULL_CONTROL - {permission})
    before = _snapshot(root)
    with pytest.raises(PermissionDenied) as caught:
        result_of(operation(fs))
    assert caught.value.permission is permission
    assert permission.value in str(caught.value)
    assert _snapshot(root) == before


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_operation_is_allowed_by_its_permission_alone(make_fs, root, result_of, name):
    """With only its permission, an operation succeeds and does its job."""
    permission, operation, effect = OPERATIONS[name]
    fs = make_fs({permission})
    _close(result_of(operation(fs)))
    if effect is not None and effect.startswith("-"):
        assert not os.path.lexists(os.path.join(root, effect[1:]))
    elif effect is not None:
        assert os.path.lexists(os.path.join(root, effect))


def test_deny_full_control_denies_everything(make_fs, result_of):
    """An empty permission set refuses every operation."""
    fs = make_fs(frozenset())
    for name, (permission, operation, _) in OPERATIONS.items():
        with pytest.raises(PermissionDenied):
            result_of(operation(fs))


def test_open_file_read_write_needs_both(make_fs, result_of):
    """``O_RDWR`` needs read and write; ``O_WRONLY`` needs write only; ``O_RDONLY`` read only."""
    for permissions in ({Permission.READ}, {Permission.WRITE}):
        with pytest.raises(PermissionDenied):
            result_of(make_fs(permissions).open_file("/a.txt", os.O_RDWR))
    _close(result_of(make_fs({Permission.READ, Permission.WRITE}).open_file("/a.txt", os.O_RDWR)))
    with pytest.raises(PermissionDenied) as caught:
        result_of(make_fs({Permission.READ}).open_file("/a.txt", os.O_WRONLY))
    assert caught.value.permission is Permission.WRITE
    for flags in (os.O_WRONLY | os.O_APPEND, os.O_WRONLY | os.O_TRUNC, os.O_RDONLY | os.O_CREAT):
        with pytest.raises(PermissionDenied):
            result_of(make_fs({Permission.READ}).open_file("/a.txt", flags))
    with pytest.raises(PermissionDenied) as caught:
        result_of(make_fs({Permission.WRITE}).open_file("/a.txt", os.O_RDONLY))
    assert caught.value.permission is Permission.READ


def test_open_file_write_lands_inside(make_fs, root, result_of):
    """A file opened for writing is created inside the home folder."""
    fd = result_of(make_fs().open_file("../../new.txt", os.O_WRONLY | os.O_CREAT, 0o600))
    try:
        os.write(fd, b"data")
    finally:
        os.close(fd)
    with open(os.path.join(root, "new.txt"), "rb") as written:
        assert written.read() == b"data"


def test_offsets_resume_reads_and_writes(make_fs, root, result_of):
    """open_for_reading(offset) starts there; open_for_writing(offset) keeps the bytes before it and drops the rest."""
    fs = make_fs()
    with open(os.path.join(root, "resume.bin"), "wb") as file:
        file.write(b"0123456789")
    with result_of(fs.open_for_reading("/resume.bin", offset=4)) as file:
        assert file.read() == b"456789"
    with result_of(fs.open_for_reading("/resume.bin", offset=10)) as file:
        assert file.read() == b""
    upload = result_of(fs.open_for_writing("/resume.bin", offset=6))
    with upload.file as file:
        upload.begin()
        file.write(b"ab")
    with open(os.path.join(root, "resume.bin"), "rb") as file:
        assert file.read() == b"012345ab"


@pytest.mark.parametrize("options", [{}, {"append": True}, {"offset": 4}])
def test_an_upload_changes_its_file_only_once_it_begins(make_fs, root, result_of, options):
    """QA, session 27: STOR emptied the file on opening, before its data connection was refused (FTPS)."""
    fs = make_fs()
    path = os.path.join(root, "kept.bin")
    with open(path, "wb") as file:
        file.write(b"0123456789")
    result_of(fs.abandon_upload(result_of(fs.open_for_writing("/kept.bin", **options)), "/kept.bin"))
    assert open(path, "rb").read() == b"0123456789"
    upload = result_of(fs.open_for_writing("/kept.bin", **options))
    upload.begin()
    upload.file.close()
    expected = {"append": b"0123456789", "offset": b"0123"}.get(next(iter(options), ""), b"")
    assert open(path, "rb").read() == expected


def test_an_abandoned_upload_removes_only_the_file_its_opening_created(root, run_in_thread, result_of, log_lines):
    """The "upload to" line of the opening is followed by what became of the file (QA, session 27)."""
    fs = JailedFilesystem(root, FULL_CONTROL, run_in_thread, log_as="ftp alice")
    result_of(fs.abandon_upload(result_of(fs.open_for_writing("/made.bin")), "/made.bin"))
    assert not os.path.exists(os.path.join(root, "made.bin"))
    result_of(fs.abandon_upload(result_of(fs.open_for_writing("/made.bin", append=True)), "/made.bin"))
    assert not os.path.exists(os.path.join(root, "made.bin"))
    upload = result_of(fs.open_for_writing("/made.bin"))
    with open(os.path.join(root, "other.bin"), "wb") as other:
        other.write(b"not the upload's")
    os.replace(os.path.join(root, "other.bin"), os.path.join(root, "made.bin"))  # another session's file took the name
    result_of(fs.abandon_upload(upload, "/made.bin"))
    assert open(os.path.join(root, "made.bin"), "rb").read() == b"not the upload's"
    assert [line for line in log_lines if "got no data" in line] == [
        "ftp alice: upload to /made.bin got no data: the file it created is removed",
        "ftp alice: upload to /made.bin got no data: the file it created is removed",
        "ftp alice: upload to /made.bin got no data: the file is as it was",
    ]


@pytest.mark.parametrize("second", [{}, {"append": True}, {"offset": 2}])
def test_a_file_being_uploaded_cannot_be_uploaded_by_another_at_once(make_fs, root, result_of, second):
    """The second upload is refused before it empties, appends to or cuts the file; once the first ends, it may."""
    fs = make_fs()
    first = result_of(fs.open_for_writing("/same.bin"))
    first.begin()
    first.file.write(b"first upload")
    first.file.flush()
    with pytest.raises(BlockingIOError):
        result_of(fs.open_for_writing("/same.bin", **second))
    first.file.close()
    assert open(os.path.join(root, "same.bin"), "rb").read() == b"first upload"
    result_of(fs.open_for_writing("/same.bin", **second)).file.close()


def test_offsets_past_the_end_or_on_a_missing_file_are_refused(make_fs, root, result_of):
    """Past the end: OffsetPastEnd and the file unchanged; resuming an upload needs the file."""
    fs = make_fs()
    with pytest.raises(OffsetPastEnd, match="offset 2 is past the end of the file .1 bytes."):
        result_of(fs.open_for_reading("/a.txt", offset=2))
    with pytest.raises(OffsetPastEnd):
        result_of(fs.open_for_writing("/a.txt", offset=2))
    with open(os.path.join(root, "a.txt"), "rb") as file:
        assert file.read() == b"a"
    with pytest.raises(FileNotFoundError):
        result_of(fs.open_for_writing("/not-there.bin", offset=1))
    assert not os.path.exists(os.path.join(root, "not-there.bin"))


def test_reading_through_an_outside_symlink_is_refused(make_fs, result_of):
    """Files behind a symlink to /etc or outside the home cannot be opened."""
    fs = make_fs()
    for path in ("link/passwd", "/link/hostname", "docs/deep/leak.txt", "hop2/secret.txt"):
        with pytest.raises(OutsideJail):
            result_of(fs.open_for_reading(path))
        with pytest.raises(OutsideJail):
            result_of(fs.open_file(path, os.O_RDONLY))


def test_writing_through_an_outside_symlink_is_refused(make_fs, tmp_path, result_of):
    """No write, folder creation or rename target can reach outside the home through a symlink."""
    fs = make_fs()
    with pytest.raises(OutsideJail):
        result_of(fs.open_for_writing("hop1/planted.txt"))
    with pytest.raises(OutsideJail):
        result_of(fs.open_file("hop2/planted.txt", os.O_WRONLY | os.O_CREAT))
    with pytest.raises(OutsideJail):
        result_of(fs.make_directory("hop1/planted"))
    with pytest.raises(OutsideJail):
        result_of(fs.rename("/a.txt", "/hop1/planted.txt"))
    with pytest.raises(OutsideJail):
        result_of(fs.remove_file("docs/deep/leak.txt"))
    with pytest.raises(OutsideJail):
        result_of(fs.remove_file("hop1/secret.txt"))  # a folder of the path leads outside
    assert sorted(os.listdir(tmp_path / "outside")) == ["secret.txt"]


def test_invalid_paths_fail_the_operation(make_fs, result_of):
    """An operation on a NUL path, an impossible one or a new name that is not UTF-8 fails with InvalidPath."""
    fs = make_fs()
    with pytest.raises(InvalidPath):
        result_of(fs.open_for_reading("a\0.txt"))
    with pytest.raises(InvalidPath):
        result_of(fs.list_directory("\ud800"))
    with pytest.raises(InvalidPath):
        result_of(fs.rename("/a.txt", "x" * 300))
    with pytest.raises(InvalidName):
        result_of(fs.open_file(b"\xfe", os.O_WRONLY | os.O_CREAT))
    with pytest.raises(InvalidName):
        result_of(fs.rename("/a.txt", b"caf\xe9"))


@pytest.mark.parametrize("ending", ["/", "/.", "//"])
def test_a_file_named_as_a_folder_is_not_one(make_fs, root, result_of, ending):
    """``a.txt/`` is refused for a file as the kernel refuses it (ENOTDIR): nothing is read, written, removed or moved."""
    fs = make_fs()
    name = "a.txt" + ending
    for operation in (
        lambda: fs.stat(name),
        lambda: fs.require_existing(name),
        lambda: fs.list_directory(name),
        lambda: fs.open_for_reading(name),
        lambda: fs.open_for_writing(name),
        lambda: fs.open_file(name, os.O_RDONLY),
        lambda: fs.open_file(name, os.O_WRONLY | os.O_TRUNC),
        lambda: fs.remove_file(name),
        lambda: fs.set_attributes(name, size=0),
        lambda: fs.rename(name, "b.txt"),
        lambda: fs.rename("a.txt", "b.txt" + ending),
    ):
        with pytest.raises(NotADirectoryError):
            result_of(operation())
    assert result_of(fs.is_directory(name)) is False
    assert open(os.path.join(root, "a.txt"), encoding="utf-8").read() == "a"
    assert not os.path.lexists(os.path.join(root, "b.txt"))


def test_a_new_file_cannot_be_named_as_a_folder(make_fs, root, result_of):
    fs = make_fs()
    for operation in (lambda: fs.open_for_writing("new/"), lambda: fs.open_file("new/", os.O_WRONLY | os.O_CREAT)):
        with pytest.raises(InvalidName, match="a file name cannot end with /"):
            result_of(operation())
    assert not os.path.lexists(os.path.join(root, "new"))
    with pytest.raises(FileNotFoundError):
        result_of(fs.open_file("new/", os.O_RDONLY))


def test_folders_and_new_folders_may_be_named_with_a_trailing_slash(make_fs, root, result_of):
    fs = make_fs()
    assert stat.S_ISDIR(result_of(fs.stat("docs/")).st_mode)
    assert result_of(fs.is_directory("docs/")) is True
    assert [name for name, *_ in result_of(fs.list_directory("docs/"))] == ["deep", "report.txt", "up"]  # far-up leads outside: hidden
    result_of(fs.make_directory("made/"))
    result_of(fs.rename("made/", "moved/"))
    result_of(fs.remove_directory("moved/"))
    assert not os.path.lexists(os.path.join(root, "moved"))
    assert stat.S_ISDIR(result_of(fs.stat("inside-link/")).st_mode)  # a link to a folder is followed to it


def test_a_link_named_as_a_folder_is_not_removed_or_moved_itself(make_fs, root, result_of):
    """``link/`` names the folder it points to, so removing or moving the link through it is refused, as rmdir/unlink do."""
    fs = make_fs()
    for operation in (lambda: fs.remove_file("inside-link/"), lambda: fs.remove_directory("inside-link/"),
                      lambda: fs.rename("inside-link/", "other")):
        with pytest.raises(NotADirectoryError):
            result_of(operation())
    assert os.path.islink(os.path.join(root, "inside-link")) and os.path.isdir(os.path.join(root, "docs"))


def test_existing_names_that_are_not_utf8_stay_usable(make_fs, root, result_of):
    """A file put there with a Latin-1 name is read, renamed to a good name and deleted."""
    latin1 = os.path.join(os.fsencode(root), b"caf\xe9.txt")
    with open(latin1, "wb") as made:
        made.write(b"old")
    fs = make_fs(FULL_CONTROL)
    listed = [name for name, *_ in result_of(fs.list_directory("/"))]
    assert "caf\udce9.txt" in listed
    assert result_of(fs.stat(b"/caf\xe9.txt")).st_size == 3
    result_of(fs.rename(b"/caf\xe9.txt", "/caf\u00e9.txt"))
    assert os.path.exists(os.path.join(root, "caf\u00e9.txt")) and not os.path.exists(latin1)
    with open(latin1, "wb") as made:
        made.write(b"again")
    result_of(fs.remove_file("/caf\udce9.txt"))
    assert not os.path.exists(latin1)


def test_list_directory_hides_entries_leading_outside(make_fs, result_of):
    """Listing the home shows files, folders and inside symlinks, never ones leading outside."""
    names = [name for name, *_ in result_of(make_fs().list_directory("/"))]
    assert names == sorted(names)
    assert set(names) == {"a.txt", "absolute-inside-link", "chain-inside", "docs", "empty", "inside-link"}
    deep = [name for name, *_ in result_of(make_fs().list_directory("/docs/deep"))]
    assert deep == []


def test_symlinks_are_listed_as_links_to_where_they_lead_as_the_session_sees_it(make_fs, root, result_of):
    """A link is a link (never what it points to), its target relative to its folder, never a server path.

    A client deleting a folder recursively then deletes the link instead of
    going through it (through ``docs/up``, into everything).
    """
    os.symlink("gone.txt", os.path.join(root, "dangling"))
    listed = {entry.name: entry for entry in result_of(make_fs().list_directory("/"))}
    links = {name: entry.link for name, entry in listed.items() if entry.link is not None}
    assert links == {
        "absolute-inside-link": "docs/report.txt",  # the link holds the server path
        "chain-inside": "docs",  # where the chain ends
        "dangling": "gone.txt",  # deletable, so listed
        "inside-link": "docs",
    }
    for name, target in links.items():
        assert stat.S_ISLNK(listed[name].result.st_mode)
        assert listed[name].result.st_size == len(target)
    assert listed["a.txt"].link is None and stat.S_ISREG(listed["a.txt"].result.st_mode)
    ((up,),) = [[entry for entry in result_of(make_fs().list_directory("/docs")) if entry.name == "up"]]
    assert up.link == ".." and stat.S_ISLNK(up.result.st_mode)
    folder = result_of(make_fs().open_folder("/docs")).read_all()  # SFTP's READDIR reads the same
    assert {entry.name: entry.link for entry in folder} == {"deep": None, "report.txt": None, "up": ".."}


def test_lstat_and_read_link_give_the_link_itself(make_fs, root, result_of):
    """SFTP LSTAT and READLINK: the link and its target in the session's terms; stat still follows it."""
    fs = make_fs()
    link = result_of(fs.lstat("/inside-link"))
    assert (link.name, link.link, link.result.st_size) == ("inside-link", "docs", len("docs"))
    assert stat.S_ISLNK(link.result.st_mode)
    assert stat.S_ISDIR(result_of(fs.stat("/inside-link")).st_mode)
    assert result_of(fs.read_link("/absolute-inside-link")) == "docs/report.txt"
    assert result_of(fs.read_link("up", cwd="/docs")) == ".."
    assert result_of(fs.read_link("/docs/up")) == ".."
    file = result_of(fs.lstat("/a.txt"))
    assert file.link is None and file.result.st_size == 1
    assert result_of(fs.lstat("/")).link is None
    with pytest.raises(OSError) as not_a_link:
        result_of(fs.read_link("/a.txt"))
    assert not_a_link.value.errno == errno.EINVAL
    for outside in ("/link", "/hop2", "/docs/far-up", "/sibling"):
        with pytest.raises(OutsideJail):
            result_of(fs.read_link(outside))
        with pytest.raises(OutsideJail):
            result_of(fs.lstat(outside))
    with pytest.raises(FileNotFoundError):
        result_of(fs.read_link("/nothing"))
    with pytest.raises(PermissionDenied):
        result_of(make_fs(frozenset({Permission.WRITE})).lstat("/inside-link"))
    through = result_of(fs.lstat("/inside-link/"))  # "link/" is what it points to, as for lstat(2)
    assert through.link is None and stat.S_ISDIR(through.result.st_mode)
    with pytest.raises(NotADirectoryError):
        result_of(fs.lstat("/absolute-inside-link/"))
    with pytest.raises(OSError) as followed:
        result_of(fs.read_link("/inside-link/"))
    assert followed.value.errno == errno.EINVAL


def test_a_loop_of_links_is_listed_with_its_next_step_and_is_no_file(make_fs, root, result_of):
    """a -> b -> a: each is listed as a link to the other (realpath stops on the loop), and stats as a loop, never as a file."""
    os.symlink("loopb", os.path.join(root, "loopa"))
    os.symlink("loopa", os.path.join(root, "loopb"))
    os.symlink("docs/../self", os.path.join(root, "self"))
    fs = make_fs()
    links = {entry.name: entry.link for entry in result_of(fs.list_directory("/")) if entry.link is not None}
    assert (links["loopa"], links["loopb"], links["self"]) == ("loopb", "loopa", "self")
    assert result_of(fs.read_link("/loopa")) == "loopb"
    for path in ("/loopa", "/self"):
        with pytest.raises(OSError) as loop:
            result_of(fs.stat(path))
        assert loop.value.errno == errno.ELOOP
    result_of(fs.remove_file("/loopa"))  # a loop can go
    assert not os.path.lexists(os.path.join(root, "loopa"))


def test_list_directory_of_a_file_lists_the_file(make_fs, result_of):
    """Listing a file gives that one file with its size."""
    ((name, stat_result, _),) = result_of(make_fs().list_directory("/docs/report.txt"))
    assert name == "report.txt"
    assert stat_result.st_size == len("report")


def test_list_directory_of_a_link_to_a_file_lists_it_under_the_link_s_name(make_fs, result_of):
    """Listing a link to a file shows the link's own name with its target's size, as ``ls -l link`` does."""
    ((name, stat_result, _),) = result_of(make_fs().list_directory("absolute-inside-link", cwd="/"))
    assert name == "absolute-inside-link"
    assert stat_result.st_size == len("report")
    ((name, *_),) = result_of(make_fs().list_directory("../inside-link/report.txt", cwd="/docs"))
    assert name == "report.txt"


def test_open_folder_refuses_a_file(make_fs, result_of):
    """SFTP opendir of a file is "not a folder", found in the same thread trip as the folder is opened."""
    for path in ("/docs/report.txt", "/docs/report.txt/", "docs/report.txt/."):
        with pytest.raises(NotADirectoryError):
            result_of(make_fs().open_folder(path))
    with pytest.raises(FileNotFoundError):
        result_of(make_fs().open_folder("/nothing/"))
    assert result_of(make_fs().open_folder("/docs/")).read(10)
    reader = result_of(make_fs().open_folder("/docs"))
    assert sorted(name for name, *_ in reader.read(10)) == ["deep", "report.txt", "up"]  # the folder's own order
    assert reader.finished


def test_list_directory_of_an_outside_symlink_is_refused(make_fs, result_of):
    """Listing through a symlink to /etc is OutsideJail, not the content of /etc."""
    with pytest.raises(OutsideJail):
        result_of(make_fs().list_directory("/link"))


@pytest.mark.parametrize("path", ["/", ".", "..", "/..", "sub/.."])
def test_home_folder_cannot_be_removed(tmp_path, run_in_thread, result_of, path):
    """remove_directory of an empty session root (however named) is refused."""
    home = tmp_path / "empty-home"
    home.mkdir()
    fs = JailedFilesystem(str(home), FULL_CONTROL, run_in_thread)
    with pytest.raises(PermissionError):
        result_of(fs.remove_directory(path))
    assert home.is_dir()


def test_home_folder_cannot_be_removed_through_a_symlink(make_fs, root, result_of):
    """A symlink inside that points at the home folder cannot be used to remove it: a link is no folder."""
    with pytest.raises(NotADirectoryError):
        result_of(make_fs().remove_directory("docs/up"))
    assert os.path.isdir(root) and os.path.islink(os.path.join(root, "docs", "up"))


@pytest.mark.parametrize("path", ["/", ".", "/..", "docs/.."])
def test_home_folder_cannot_be_renamed(make_fs, root, result_of, path):
    """rename of the session root (however named) is refused."""
    with pytest.raises(PermissionError):
        result_of(make_fs().rename(path, "/moved"))
    assert os.path.isdir(root)
    assert not os.path.exists(os.path.join(root, "moved"))


def test_renaming_a_link_to_the_home_renames_the_link(make_fs, root, result_of):
    """docs/up -> .. is renamed itself, as rename(2) does; the home folder and its files stay where they are."""
    result_of(make_fs().rename("docs/up", "/docs/parent"))
    assert os.readlink(os.path.join(root, "docs", "parent")) == ".."
    assert not os.path.lexists(os.path.join(root, "docs", "up"))
    assert os.path.isfile(os.path.join(root, "a.txt"))


def test_deleting_a_link_deletes_the_link_not_the_file(make_fs, root, result_of):
    """DELE / SFTP remove of a symlink to a file inside the home removes the link; the file keeps its content."""
    result_of(make_fs().remove_file("absolute-inside-link"))
    assert not os.path.lexists(os.path.join(root, "absolute-inside-link"))
    with open(os.path.join(root, "docs", "report.txt"), encoding="utf-8") as report:
        assert report.read() == "report"


def test_deleting_a_link_to_a_folder_removes_only_the_link(make_fs, root, result_of):
    """DELE of inside-link -> docs: the link goes, docs and its files stay (RMD of the link is "not a folder")."""
    with pytest.raises(NotADirectoryError):
        result_of(make_fs().remove_directory("inside-link"))
    result_of(make_fs().remove_file("inside-link"))
    assert not os.path.lexists(os.path.join(root, "inside-link"))
    assert os.path.isfile(os.path.join(root, "docs", "report.txt"))


@pytest.mark.parametrize("link", ["link", "hop2", "docs/far-up"])
def test_links_leading_outside_cannot_be_deleted_or_renamed(make_fs, root, result_of, link):
    """The jail hides them from listings and refuses them everywhere: removing or renaming them too."""
    with pytest.raises(OutsideJail):
        result_of(make_fs().remove_file(link))
    with pytest.raises(OutsideJail):
        result_of(make_fs().rename(link, "/moved"))
    assert os.path.islink(os.path.join(root, link)) and not os.path.lexists(os.path.join(root, "moved"))


def test_a_dangling_link_can_be_deleted(make_fs, root, result_of):
    os.symlink("gone.txt", os.path.join(root, "dangling"))
    result_of(make_fs().remove_file("dangling"))
    assert not os.path.lexists(os.path.join(root, "dangling"))


def test_renaming_a_link_moves_the_link_and_keeps_its_file(make_fs, root, result_of):
    """RNFR/RNTO of a link to a file: the link gets the new name; the file is neither moved nor changed."""
    result_of(make_fs().rename("absolute-inside-link", "/empty/shortcut"))
    assert os.path.islink(os.path.join(root, "empty", "shortcut"))
    assert os.path.isfile(os.path.join(root, "docs", "report.txt"))


def test_renaming_onto_a_link_replaces_the_link_not_its_file(make_fs, root, result_of):
    """A rename whose target is a link to a file replaces the link; the file it pointed to keeps its content."""
    result_of(make_fs().rename("a.txt", "absolute-inside-link"))
    with open(os.path.join(root, "absolute-inside-link"), encoding="utf-8") as moved:
        assert moved.read() == "a"
    assert not os.path.islink(os.path.join(root, "absolute-inside-link"))
    with open(os.path.join(root, "docs", "report.txt"), encoding="utf-8") as report:
        assert report.read() == "report"


def test_a_link_in_a_linked_folder_is_renamed_where_it_really_is(make_fs, root, result_of):
    """The folders of the path are followed (inside-link -> docs), only its last name is not."""
    result_of(make_fs().rename("inside-link/up", "inside-link/up-again"))
    assert os.readlink(os.path.join(root, "docs", "up-again")) == ".."


def test_rename_without_overwrite_keeps_the_target(make_fs, root, result_of):
    """rename with overwrite=False refuses an existing target and keeps both files."""
    with pytest.raises(FileExistsError):
        result_of(make_fs().rename("/a.txt", "/docs/report.txt", overwrite=False))
    assert os.path.exists(os.path.join(root, "a.txt"))
    with open(os.path.join(root, "docs", "report.txt"), encoding="utf-8") as report:
        assert report.read() == "report"


def test_rename_moves_inside_the_home(make_fs, root, result_of):
    """rename with relative names and a cwd moves the file inside the home."""
    result_of(make_fs().rename("../a.txt", "moved.txt", cwd="/docs"))
    assert os.path.exists(os.path.join(root, "docs", "moved.txt"))
    assert not os.path.exists(os.path.join(root, "a.txt"))


def test_remove_file_refuses_a_folder_and_remove_directory_a_file(make_fs, root, result_of):
    """remove_file does not delete folders; remove_directory does not delete files."""
    with pytest.raises(IsADirectoryError):
        result_of(make_fs().remove_file("/empty"))
    with pytest.raises(NotADirectoryError):
        result_of(make_fs().remove_directory("/a.txt"))
    assert os.path.isdir(os.path.join(root, "empty"))
    assert os.path.isfile(os.path.join(root, "a.txt"))


def test_open_for_reading_a_folder_is_refused(make_fs, result_of):
    """Opening a folder as a file is IsADirectoryError, not a crash."""
    with pytest.raises(IsADirectoryError):
        result_of(make_fs().open_for_reading("/docs"))
    with pytest.raises(IsADirectoryError):
        result_of(make_fs().open_file("/docs", os.O_RDONLY))


def test_is_directory_needs_no_permission(make_fs, result_of):
    """Checking for a folder (CWD) works without any permission, and stays in the jail."""
    fs = make_fs(frozenset())
    assert result_of(fs.is_directory("/docs")) is True
    assert result_of(fs.is_directory("/a.txt")) is False
    with pytest.raises(OutsideJail):
        result_of(fs.is_directory("/link"))


def test_rename_over_a_file_needs_the_right_to_delete_it(make_fs, root, result_of):
    """Replacing an existing file by rename is refused without allow-delete-file and keeps both files."""
    fs = make_fs({Permission.RENAME, Permission.LIST, Permission.READ})
    with pytest.raises(PermissionDenied):
        result_of(fs.rename("/a.txt", "/docs/report.txt"))
    with open(os.path.join(root, "docs", "report.txt"), encoding="utf-8") as report:
        assert report.read() == "report"
    assert os.path.exists(os.path.join(root, "a.txt"))
    result_of(make_fs({Permission.RENAME, Permission.DELETE_FILE}).rename("/a.txt", "/docs/report.txt"))
    assert not os.path.exists(os.path.join(root, "a.txt"))


def test_rename_of_a_missing_source_onto_an_existing_name_says_the_source_is_missing(make_fs, root, result_of):
    """Not "the target exists": nothing would be renamed whatever the target (SFTP v3 rename, FTP RNTO)."""
    fs = make_fs(FULL_CONTROL)
    for overwrite in (False, True):
        with pytest.raises(FileNotFoundError):
            result_of(fs.rename("/no-such-file", "/a.txt", overwrite=overwrite))
    assert open(os.path.join(root, "a.txt"), encoding="utf-8").read() == "a"


def test_rename_never_replaces_a_folder(make_fs, root, result_of):
    """A rename onto an existing folder is refused, even with full control."""
    with pytest.raises(FileExistsError):
        result_of(make_fs().rename("/a.txt", "/empty"))
    assert os.path.isdir(os.path.join(root, "empty"))


def test_stat_needs_list_or_read(make_fs, result_of):
    """stat is refused with neither allow-list nor allow-read, and allowed by either alone."""
    with pytest.raises(PermissionDenied):
        result_of(make_fs(FULL_CONTROL - {Permission.LIST, Permission.READ}).stat("/a.txt"))
    for permission in (Permission.LIST, Permission.READ):
        assert result_of(make_fs({permission}).stat("/a.txt")).st_size > 0


def test_set_attributes_truncates_before_setting_the_times(make_fs, root, result_of):
    """A size change moves mtime: the times asked for in the same request are applied after it."""
    fs = make_fs(FULL_CONTROL)
    result_of(fs.set_attributes("/a.txt", size=2, times=(1000.0, 2000.0)))
    path = os.path.join(root, "a.txt")
    assert os.path.getsize(path) == 2
    assert os.stat(path).st_mtime == 2000.0


# -- a folder swapped for a link between the check and the use ------------------------
#
# resolve() checks a path, then the operation uses it. Someone with a shell on
# the machine (not the client) can swap a folder of the path for a link to
# anywhere in between. Each operation must then fail or stay inside: it may not
# follow the new link. The swap is made exactly in that window here; a real
# race with real clients is in tests/integration/test_ftp.py and test_sftp.py (jail_race.py).


@pytest.fixture
def raced(root, monkeypatch):
    """Make ``/sw`` a link to a folder outside right after the operation's path was resolved; returns the outside folder."""
    from sftpauth import filesystem

    home = root
    outside = os.path.join(os.path.dirname(home), "outside-sw")
    for base in (os.path.join(home, "sw"), outside):
        os.mkdir(base)
        os.mkdir(os.path.join(base, "emptydir"))
        with open(os.path.join(base, "secret.txt"), "w", encoding="utf-8") as file:
            file.write("inside" if base != outside else "OUTSIDE, longer than inside")
    with open(os.path.join(outside, "only-outside.txt"), "w", encoding="utf-8") as file:
        file.write("OUTSIDE")

    def swap():
        if not os.path.islink(os.path.join(home, "sw")):
            os.rename(os.path.join(home, "sw"), os.path.join(home, "sw-was-here"))
            os.symlink(outside, os.path.join(home, "sw"))

    for name in ("resolve", "resolve_entry"):
        checked = getattr(filesystem, name)

        def then_swap(*args, _checked=checked, **kwargs):
            real = _checked(*args, **kwargs)
            swap()
            return real

        monkeypatch.setattr(filesystem, name, then_swap)
    return outside


def _tree(folder):
    """Every entry under ``folder`` with its content or kind and mtime: what must not change."""
    found = {}
    for base, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(base, name)
            status = os.lstat(path)
            content = open(path, "rb").read() if os.path.isfile(path) and not os.path.islink(path) else None
            found[os.path.relpath(path, folder)] = (status.st_mode, status.st_mtime_ns, content)
    return found


RACED = {
    "read": lambda fs: fs.open_for_reading("/sw/secret.txt"),
    "resumed-read": lambda fs: fs.open_for_reading("/sw/secret.txt", offset=2),
    "open-read": lambda fs: fs.open_file("/sw/secret.txt", os.O_RDONLY),
    "write": lambda fs: fs.open_for_writing("/sw/planted.txt"),
    "append": lambda fs: fs.open_for_writing("/sw/secret.txt", append=True),
    "resumed-write": lambda fs: fs.open_for_writing("/sw/secret.txt", offset=2),
    "open-write": lambda fs: fs.open_file("/sw/planted.txt", os.O_WRONLY | os.O_CREAT),
    "open-truncate": lambda fs: fs.open_file("/sw/secret.txt", os.O_WRONLY | os.O_TRUNC),
    "truncate": lambda fs: fs.set_attributes("/sw/secret.txt", size=0),
    "set-times": lambda fs: fs.set_times("/sw/secret.txt", 1000.0, 1000.0),
    "create-folder": lambda fs: fs.make_directory("/sw/planted"),
    "delete-file": lambda fs: fs.remove_file("/sw/secret.txt"),
    "delete-folder": lambda fs: fs.remove_directory("/sw/emptydir"),
    "rename-out-of": lambda fs: fs.rename("/sw/secret.txt", "/taken.txt"),
    "rename-into": lambda fs: fs.rename("/a.txt", "/sw/planted.txt"),
    "stat": lambda fs: fs.stat("/sw/secret.txt"),
    "lstat": lambda fs: fs.lstat("/sw/secret.txt"),
    "is-directory": lambda fs: fs.is_directory("/sw/emptydir"),
    "list": lambda fs: fs.list_directory("/sw"),
    "list-file": lambda fs: fs.list_directory("/sw/secret.txt"),
    "open-folder": lambda fs: fs.open_folder("/sw", then=lambda reader: reader.read_all()),
}


@pytest.mark.parametrize("name", sorted(RACED))
def test_a_folder_swapped_for_a_link_after_the_check_is_not_followed(make_fs, root, raced, result_of, name):
    """The operation fails or acts inside: nothing outside is read, listed, stat-ed, made, changed or removed."""
    before = _tree(raced)
    outside_size = os.path.getsize(os.path.join(raced, "secret.txt"))
    try:
        result = result_of(RACED[name](make_fs(FULL_CONTROL)))
    except (OSError, OutsideJail):  # refused: what the race may cost the client
        result = None
    try:
        assert _tree(raced) == before
        if hasattr(result, "read"):
            assert b"OUTSIDE"[2:] not in result.read()
        elif isinstance(result, int) and not isinstance(result, bool):
            assert b"OUTSIDE"[2:] not in os.pread(result, 100, 0)
        elif isinstance(result, os.stat_result):
            assert result.st_size != outside_size
        elif isinstance(result, Listed):
            assert result.result.st_size != outside_size
        elif isinstance(result, list):
            assert "only-outside.txt" not in [entry.name for entry in result]
            assert all(entry.result.st_size != outside_size for entry in result)
        elif name == "is-directory":
            assert result is not True
    finally:
        _close(result)
