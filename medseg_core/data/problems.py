"""Problems found in a site dataset, and the error raised when a dataset cannot be used.

A :class:`Problem` always names the file (or folder) it is about and says, in words, what is wrong.
Validation collects every problem instead of stopping at the first, so a hospital sees the whole list
in one go.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITIES = (ERROR, WARNING, INFO)


@dataclass(frozen=True)
class Problem:
    """One finding about a dataset.

    Attributes:
        severity: ``"error"`` (training refuses to start), ``"warning"`` or ``"info"``.
        code: short stable identifier, e.g. ``"shape-mismatch"`` (for tests and filtering).
        path: the file or folder the finding is about.
        message: human-readable reason.
    """

    severity: str
    code: str
    path: str
    message: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.path}: {self.message} ({self.code})"


def problem(severity: str, code: str, path: str | Path, message: str) -> Problem:
    """Build a :class:`Problem`, normalising the path to a string."""
    return Problem(severity=severity, code=code, path=str(path), message=message)


class DatasetError(ValueError):
    """A dataset cannot be used; carries every problem found.

    Raised before any training starts, so nothing already written is lost.
    """

    def __init__(self, problems: list[Problem], where: str | Path | None = None) -> None:
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == ERROR] or self.problems
        head = f"dataset {where} is not usable" if where is not None else "dataset is not usable"
        lines = [f"{head}: {len(errors)} error(s)"] + [f"  - {p.path}: {p.message}" for p in errors[:50]]
        if len(errors) > 50:
            lines.append(f"  ... and {len(errors) - 50} more")
        super().__init__("\n".join(lines))
