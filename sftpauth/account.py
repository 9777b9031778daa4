"""The authenticated account every service works with, whatever method made it."""

from __future__ import annotations

import os
from typing import Optional

import attrs

from sftpauth.auth.credentials import has_control_characters
from sftpauth.auth.errors import LoginFailed
from sftpauth.config.models import USER_MARKER, GroupSettings, user_folder_problem
from sftpauth.permissions import Permission


@attrs.frozen
class Account:
    username: str
    method_id: str
    home_folder: str
    permissions: frozenset[Permission]
    groups: tuple[str, ...]  # sftpauth group IDs, the first is primary
    create_home_folder: bool = False
    email: str = ""
    full_name: str = ""
    dn: Optional[str] = None  # the LDAP entry, for LDAP accounts
    roles: tuple[str, ...] = ()  # Web Manager role IDs, for manager logins
    # The home folder with every symbolic link resolved, found by the chain in a
    # thread when it checks the folder (the jail's root; no file I/O on the reactor).
    home_root: str = ""

    @property
    def listing_owner(self) -> tuple[str, str]:
        """The owner and group that FTP and SFTP listings show for every file: the user and the primary group.

        Files are owned by the server's own system user; the account is virtual.
        """
        return self.username, (self.groups[0] if self.groups else self.username)


def home_folder_from_group(group: GroupSettings, username: str) -> str:
    """The primary group's ``home_folder_path`` with ``${USER}`` appended if absent."""
    if not group.home_folder_path:
        raise LoginFailed(
            "home-folder-missing", f"no home folder: [groups/{group.id}] has no home_folder_path"
        )
    template = group.home_folder_path
    if USER_MARKER not in template:
        template = os.path.join(template, USER_MARKER)
    return checked_home_folder(with_user(template, username))


def with_user(template: str, username: str) -> str:
    """``template`` with ``${USER}`` replaced by the login name, which must then be one folder name.

    A name that is not (:func:`user_folder_problem`) would get someone
    else's files: the login is refused (``home-folder-invalid``).
    """
    if USER_MARKER not in template:
        return template
    problem = user_folder_problem(username)
    if problem:
        raise LoginFailed("home-folder-invalid", f"the user name {username!r} {problem}, so it cannot stand for {USER_MARKER}")
    return template.replace(USER_MARKER, username)


def checked_home_folder(path: str) -> str:
    """Refuse a home folder that is relative, climbs with ``..`` or holds a control character."""
    if "\0" in path or not os.path.isabs(path):
        raise LoginFailed("home-folder-invalid", f"home folder {path!r} is not an absolute path")
    if has_control_characters(path):
        # A line break or a terminal escape from the directory would follow the path into
        # log lines and test-login's output; no real home folder holds one.
        raise LoginFailed("home-folder-invalid", f"home folder {path!r} contains control characters or invalid bytes")
    if ".." in path.replace("\\", "/").split("/"):
        raise LoginFailed("home-folder-invalid", f"home folder {path!r} contains '..'")
    return os.path.normpath(path)


def account_for_groups(
    username: str,
    method_id: str,
    groups: tuple[GroupSettings, ...],
    home_folder: Optional[str] = None,
    **extra,
) -> Account:
    """Build the account; the primary (first) group gives permissions and home.

    A disabled group refuses every account holding it, primary or not (as a
    disabled role refuses its administrators): disabling ``contractors``
    suspends every contractor, whatever group comes first for them.
    """
    primary = groups[0]
    for group in groups:
        if not group.enabled:
            which = "primary group" if group is primary else "group"
            raise LoginFailed("group-disabled", f"{which} [groups/{group.id}] is disabled")
    home = checked_home_folder(home_folder) if home_folder else home_folder_from_group(primary, username)
    return Account(
        username=username,
        method_id=method_id,
        home_folder=home,
        permissions=primary.permissions,
        groups=tuple(group.id for group in groups),
        create_home_folder=primary.create_home_folder,
        **extra,
    )
