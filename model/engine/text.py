"""Text of a growing list of token ids, decoded incrementally, and stop strings found in it.

Re-decoding a whole output every token is quadratic; decoding only the new token is wrong for byte-level BPE, whose
tokens can split a UTF-8 character. So each push decodes a short window (from the token before the last emitted
text to the end) and emits only complete characters.
"""

from __future__ import annotations

from model.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what decoding yields for a UTF-8 sequence cut short


class IncrementalText:
    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # window start: one token of context before the first undecoded one
        self.read = 0  # ids before this are in the text
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (empty while a character is still incomplete)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: whatever is still held back, incomplete characters included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        if len(window) <= len(before) or (window.endswith(INCOMPLETE) and not final):
            return ""
        new = window[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in text[start:] as (index, stop string), or None."""
    hits = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
