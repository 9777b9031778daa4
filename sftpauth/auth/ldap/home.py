"""``home_folder_attribute``: ``attr`` or ``attr, template`` with ``{attr}`` placeholders.

In a placeholder a dash of the attribute name is written ``_``
(``{ftp_Home_Dir}`` reads ``ftp-Home-Dir``), since LDAP names use ``-``
and Python format fields cannot.
"""

from __future__ import annotations

import string
from typing import Optional

import attrs

from sftpauth.account import checked_home_folder
from sftpauth.auth.errors import LoginFailed


def placeholder_to_attribute(placeholder: str) -> str:
    return placeholder.replace("_", "-")


def _is_attribute_name(name: str) -> bool:
    return name.isascii() and name[:1].isalpha() and name.replace("_", "").replace("-", "").isalnum()


@attrs.frozen
class HomeFolderRule:
    attribute: str
    template: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> Optional["HomeFolderRule"]:
        text = text.strip()
        if not text:
            return None
        attribute, _, template = (part.strip() for part in text.partition(","))
        if not attribute or " " in attribute:
            raise ValueError(f"{text!r}: expected 'ATTRIBUTE' or 'ATTRIBUTE, TEMPLATE'")
        if not template:
            return cls(attribute)
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as error:
            raise ValueError(f"template {template!r}: {error}") from None
        for _, name, spec, conversion in parts:
            if name is None:
                continue
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            # An LDAP attribute name starts with a letter; '!r' or ':>10' would reshape the value.
            if not _is_attribute_name(name) or spec or conversion:
                raise ValueError(f"template {template!r}: {written!r} is not a placeholder such as {{uid}}")
        leading = parts[0][0] if parts else ""
        if leading and not leading.startswith("/"):
            raise ValueError(f"template {template!r}: a home folder is an absolute path; start it with '/' or a placeholder")
        return cls(attribute, template)

    @property
    def attributes(self) -> tuple[str, ...]:
        """Every attribute the rule reads."""
        names = [self.attribute]
        if self.template:
            names += [
                placeholder_to_attribute(name)
                for _, name, _, _ in string.Formatter().parse(self.template)
                if name
            ]
        return tuple(dict.fromkeys(names))

    def resolve(self, get_values) -> str:
        """The home folder from an entry; ``get_values(name)`` returns a tuple of text values."""
        values = {}
        for name in self.attributes:
            found = get_values(name)
            if not found:
                raise LoginFailed("home-folder-invalid", f"the entry has no {name!r} attribute for its home folder")
            if len(found) > 1:
                raise LoginFailed("home-folder-invalid", f"{name!r} has {len(found)} values; a home folder needs one")
            if not found[0].strip():
                raise LoginFailed("home-folder-invalid", f"{name!r} is empty")
            values[name] = found[0]
        if self.template is None:
            path = values[self.attribute]
        else:
            fields = {}
            for _, name, _, _ in string.Formatter().parse(self.template):
                if name:
                    value = values[placeholder_to_attribute(name)].replace("\\", "/")
                    segments = value.split("/")
                    if ".." in segments:
                        raise LoginFailed("home-folder-invalid", f"{placeholder_to_attribute(name)!r} contains '..'")
                    if all(segment in ("", ".") for segment in segments):
                        # "/srv/homes/{uid}" with "." or "/" would be every user's parent folder
                        raise LoginFailed("home-folder-invalid", f"{placeholder_to_attribute(name)!r} names no folder")
                    fields[name] = value
            path = self.template.format(**fields)
        return checked_home_folder(path)
