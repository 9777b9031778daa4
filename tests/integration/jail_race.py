"""A folder of a home swapped for a link to a folder outside, again and again, by another local process.

The jail checks a path, then uses it: a folder swapped for a link in between
must not be followed (SPEC §4; sftpauth/filesystem.py, ``_beneath``). The
swap needs someone with a shell on the server, never the client itself; the
tests play both and check that no byte from outside arrives and nothing
outside changes.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

INSIDE = b"inside the home"
OUTSIDE = b"OUTSIDE THE HOME"

# Renames are atomic: "sw" is in turn the folder, nothing, the link, nothing.
_SWAPPER = """
import os, sys
home = sys.argv[1]
sw, folder, link = (os.path.join(home, name) for name in ("sw", "sw-folder", "sw-link"))
while True:
    os.rename(folder, sw)
    os.rename(sw, folder)
    os.rename(link, sw)
    os.rename(sw, link)
"""


def prepare(home: Path, outside: Path) -> None:
    """``home/sw-folder/secret.txt`` (inside) and ``home/sw-link`` -> ``outside`` (holding its own secret.txt)."""
    (home / "sw-folder").mkdir(parents=True)
    (home / "sw-folder" / "secret.txt").write_bytes(INSIDE)
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_bytes(OUTSIDE)
    (home / "sw-link").symlink_to(outside)


@contextlib.contextmanager
def swapping(home: Path) -> Iterator[None]:
    """Swap ``home/sw`` between the folder and the link, as fast as another process can, while the block runs."""
    swapper = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(home)])
    time.sleep(0.1)
    try:
        assert swapper.poll() is None, "the swapper did not start"
        yield
    finally:
        swapper.kill()
        swapper.wait()


def outside_unchanged(outside: Path) -> bool:
    return sorted(path.name for path in outside.iterdir()) == ["secret.txt"] and \
        (outside / "secret.txt").read_bytes() == OUTSIDE
