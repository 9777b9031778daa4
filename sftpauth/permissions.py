"""File transfer permissions of a group (SPEC §3 [groups/ID] permissions)."""

from __future__ import annotations

import enum
from typing import Iterable


class Permission(enum.Enum):
    READ = "allow-read"
    LIST = "allow-list"
    WRITE = "allow-write"
    CREATE_FOLDER = "allow-create-folder"
    RENAME = "allow-rename"
    DELETE_FILE = "allow-delete-file"
    DELETE_FOLDER = "allow-delete-folder"


FULL_CONTROL = frozenset(Permission)
_NAMES = {p.value: p for p in Permission}
_ALLOWED_TEXT = ", ".join(["allow-full-control", "deny-full-control", *_NAMES])


def parse_permissions(names: Iterable[str]) -> frozenset[Permission]:
    """Turn configured names into a set; `deny-full-control` wins over all."""
    result: set[Permission] = set()
    denied = False
    for name in names:
        word = name.strip().lower()
        if word == "allow-full-control":
            result.update(FULL_CONTROL)
        elif word == "deny-full-control":
            denied = True
        elif word in _NAMES:
            result.add(_NAMES[word])
        else:
            raise ValueError(f"{name!r} is not a permission; allowed: {_ALLOWED_TEXT}")
    return frozenset() if denied else frozenset(result)


class PermissionDenied(Exception):
    """The account's primary group does not allow this operation."""

    def __init__(self, permission: Permission, path: str):
        self.permission = permission
        self.path = path
        super().__init__(f"{permission.value} is not granted for {path}")
