"""The audit file when the disk cannot take it: nothing fails, nothing is lost silently, nothing is written late."""

from __future__ import annotations

import errno
import json

from sftpauth.audit import AuditLog


class FullDisk:
    """An unbuffered file on a disk that takes ``room`` more bytes, then ENOSPC (a short write first, as Linux does)."""

    def __init__(self, room: int = 0):
        self.room = room
        self.data = b""

    def write(self, data: bytes) -> int:
        if not self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = data[: self.room]
        self.room -= len(taken)
        self.data += taken
        return len(taken)


def test_a_full_disk_fails_no_caller_and_its_events_go_to_the_server_log(tmp_path, log_lines):
    """QA, session 29 (high): an audit write on a full disk raised into the login being recorded (valid logins
    refused, failures never counted toward bans) or into the parent's channel (workers stopped)."""
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    audit._file.close()
    audit._file = FullDisk()
    for number in range(3):
        entry = audit.record("authentication", username=f"user{number}", outcome="failure")
        assert entry["username"] == f"user{number}"  # no exception: the login goes on
    errors = [line for line in log_lines if "cannot write the audit log" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0]  # once per outage
    kept = [line for line in log_lines if line.startswith("audit (not in ")]
    assert [json.loads(line.split(") ", 1)[1])["username"] for line in kept] == ["user0", "user1", "user2"]
    # space again: the next event is written, and the log says how many are only in the server log
    audit._file = open(tmp_path / "audit.jsonl", "ab", buffering=0)
    audit.record("authentication", username="after", outcome="success")
    assert [json.loads(line)["username"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()] == ["after"]
    assert any("written again; 3 event(s) before this are only in the server log" in line for line in log_lines)


def test_an_event_that_could_not_be_written_is_never_written_later(tmp_path):
    """QA, session 29 (medium): the line-buffered file kept a failed line and wrote it with the next one, so a login
    refused during the outage appeared later in the file as a success. The file has no buffer now."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    audit.record("authentication", username="before", outcome="success")
    real, audit._file = audit._file, FullDisk()
    audit.record("authentication", username="lost", outcome="success")
    audit._file = real
    audit.record("authentication", username="after", outcome="failure")
    assert [json.loads(line)["username"] for line in path.read_text().splitlines()] == ["before", "after"]


def test_a_line_cut_by_the_disk_filling_up_is_ended_before_the_next_one(tmp_path):
    """A short write leaves part of a line; the next event starts on a line of its own, so only the cut one is damaged."""
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    audit._file.close()
    disk = audit._file = FullDisk(room=20)
    audit.record("authentication", username="cut", outcome="failure")
    assert len(disk.data) == 20 and not disk.data.endswith(b"\n")
    disk.room = 10_000
    audit.record("authentication", username="whole", outcome="success")
    lines = disk.data.split(b"\n")
    assert lines[0] == disk.data[:20] and json.loads(lines[1])["username"] == "whole" and lines[2] == b""


def test_a_write_that_takes_no_byte_is_a_failure_not_a_loop(tmp_path, log_lines):
    """A file whose write returns 0 without an error must not keep the reactor retrying for ever."""

    class TakesNothing:
        def write(self, data: bytes) -> int:
            return 0

    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    audit._file.close()
    audit._file = TakesNothing()
    audit.record("authentication", username="stuck", outcome="failure")
    assert any("cannot write the audit log" in line and "took no bytes" in line for line in log_lines)
    assert any(line.startswith("audit (not in ") and '"stuck"' in line for line in log_lines)
