"""Reasoning control for a chat request whose prompt opened a thought (`<think>\\n`): which generated tokens are
reasoning and which are the answer, and the thinking-token budget.

Budget (REFERENCE.md section 4): once `budget` reasoning tokens are out, the thought ends at the next token that
contains a newline (`</think>` is forced right after it); if none comes within `grace` more tokens, `</think>` is
forced anyway.
"""

from __future__ import annotations

from collections.abc import Callable


class Thinking:
    def __init__(self, end_id: int, budget: int | None, grace: int, has_newline: Callable[[int], bool]):
        self.end_id = end_id
        self.budget = budget
        self.grace = grace
        self.has_newline = has_newline
        self.active = True
        """Inside the thought: the tokens generated so far are reasoning."""
        self.count = 0
        """Reasoning tokens so far."""
        self.force_end = budget == 0
        """The next token must be `</think>`."""

    def observe(self, token: int) -> None:
        """Account for one generated token (already the forced one when forcing)."""
        self.force_end = False
        if not self.active:
            return
        if token == self.end_id:
            self.active = False
            return
        self.count += 1
        if self.budget is not None and self.count >= self.budget:
            self.force_end = self.has_newline(token) or self.count >= self.budget + self.grace
