"""Files that hold private keys: written atomically, mode 0600 from the first byte."""

from __future__ import annotations

import os


def write_private_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so no reader ever sees half a key or a readable mode."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as private_file:
            private_file.write(data)
            private_file.flush()
            os.fsync(private_file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
