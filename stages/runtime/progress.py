"""How stages report progress without knowing how it is shown: the CLI passes a rich implementation, tests and
non-main ranks the quiet one."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total: float | None = None, completed: float = 0) -> None:
        """Begin a phase of `total` units (None: unknown); `completed` of them may be done already (a resume)."""

    def advance(self, amount: float = 1, **fields: object) -> None:
        """Count `amount` more units done; fields (loss, lr, tokens/s...) are shown beside the bar."""

    def note(self, message: str) -> None:
        """A line for the user: what happened, or a warning."""


class Quiet:
    """Shows nothing; keeps the notes, so callers and tests can read them."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def start(self, description: str, total: float | None = None, completed: float = 0) -> None:
        pass

    def advance(self, amount: float = 1, **fields: object) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)
