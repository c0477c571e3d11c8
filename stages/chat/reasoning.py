"""The reasoning modes of a chat training mix (REFERENCE.md section 4): most conversations keep their reasoning, a
share has it stripped (the template then writes `<think></think>`: reasoning off), and a share has its last trace cut
at a random budget, the way a thinking budget ends a thought at inference (its closing `</think>` is not trained).
Nemotron 3 Nano's SFT stripped 10% and truncated 3%; those are the defaults."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from stages.chat.rows import Conversation

MODES = ("on", "off", "truncated")
_WORD = re.compile(r"\S+")


@dataclass
class ReasoningMix:
    off: float = 0.10
    """Share of conversations with reasoning whose reasoning is stripped."""
    truncated: float = 0.03
    """Share whose last reasoning trace is cut at a random budget."""

    def __post_init__(self) -> None:
        if not (0 <= self.off and 0 <= self.truncated and self.off + self.truncated <= 1):
            raise ValueError(f"reasoning shares off {self.off} and truncated {self.truncated} must be >= 0 and sum "
                             "to at most 1")

    def apply(self, conversations: list[Conversation], seed: int) -> tuple[list[Conversation], dict[str, int]]:
        """The conversations in their modes, and how many took each ("without": had no reasoning). Exactly
        round(share x n) of the n that carry reasoning are stripped or truncated (a trace of one word cannot be cut and
        stays on), chosen by the seed."""
        rng = random.Random(seed)
        thinking = [i for i, c in enumerate(conversations) if _reasoning_turns(c)]
        rng.shuffle(thinking)
        n_off, n_cut = round(self.off * len(thinking)), round(self.truncated * len(thinking))
        modes = dict.fromkeys(thinking[:n_off], "off") | dict.fromkeys(thinking[n_off : n_off + n_cut], "truncated")
        out, counts = [], dict.fromkeys((*MODES, "without"), 0)
        with_reasoning = set(thinking)
        for i, conversation in enumerate(conversations):
            mode = modes.get(i, "on" if i in with_reasoning else "without")
            if mode == "off":
                conversation = strip_reasoning(conversation)
            elif mode == "truncated":
                conversation, cut = truncate_reasoning(conversation, rng)
                mode = "truncated" if cut else "on"
            counts[mode] += 1
            out.append(conversation)
        return out, counts


def strip_reasoning(conversation: Conversation) -> Conversation:
    messages = [{k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning_truncated")}
                for m in conversation.messages]
    return replace(conversation, messages=messages)


def truncate_reasoning(conversation: Conversation, rng: random.Random) -> tuple[Conversation, bool]:
    """The last reasoning trace cut after a random number of its words (at least one, never all); False when it
    has fewer than two words."""
    i = _reasoning_turns(conversation)[-1]
    message = conversation.messages[i]
    words = list(_WORD.finditer(message["reasoning_content"]))
    if len(words) < 2:
        return conversation, False
    end = words[rng.randrange(1, len(words)) - 1].end()
    messages = list(conversation.messages)
    messages[i] = message | {"reasoning_content": message["reasoning_content"][:end], "reasoning_truncated": True}
    return replace(conversation, messages=messages), True


def _reasoning_turns(conversation: Conversation) -> list[int]:
    return [i for i, m in enumerate(conversation.messages)
            if m["role"] == "assistant" and (m.get("reasoning_content") or "").strip()]
