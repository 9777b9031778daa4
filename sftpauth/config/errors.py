"""Configuration errors that point at the file, line, section and option."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import attrs


@attrs.frozen
class ConfigProblem:
    """One thing wrong (or worth a warning) in a configuration file."""

    path: str
    line: Optional[int]
    section: Optional[str]
    option: Optional[str]
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        parts = [where]
        if self.section is not None:
            parts.append(f"[{self.section}]")
        if self.option is not None:
            parts.append(self.option)
        return " ".join(parts) + ": " + self.message


class ConfigError(Exception):
    """The configuration cannot be used; carries every problem found."""

    def __init__(
        self, problems: Iterable[ConfigProblem], warnings: Iterable[ConfigProblem] = (), configuration: Any = None
    ):
        self.problems = in_file_order(problems)
        # What would also have been warned about: shown after the errors, so
        # fixing the errors does not reveal a second list.
        self.warnings = in_file_order(warnings)
        # What could be built despite the errors (sections without any): check-config
        # reads its files too, so one run reports every problem.
        self.configuration = configuration
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join([str(p) for p in self.problems] + [f"warning: {w}" for w in self.warnings])


def in_file_order(problems: Iterable[ConfigProblem]) -> tuple[ConfigProblem, ...]:
    """By file, then line (problems of the whole file first); problems of one line keep their order."""
    return tuple(sorted(problems, key=lambda problem: (problem.path, problem.line or 0)))
