"""A small file system of its own (tmpfs) mounted in a test's folder: a disk that fills up.

Mounting needs root, as the CI runs (SFTPAUTH_REQUIRE_INTEGRATION=1: the
test fails without it); a developer without root sees the test skipped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from .sftp_fixtures import integration_required


@contextlib.contextmanager
def small_file_system(folder: Path, size_bytes: int) -> Iterator[Path]:
    """``folder`` (made if missing) with a tmpfs of ``size_bytes`` mounted on it, unmounted at the end."""
    if os.geteuid() != 0:
        message = "mounting a small tmpfs (a disk that fills up) needs root"
        if integration_required():
            pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but {message}", pytrace=False)
        pytest.skip(message)
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0777", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
