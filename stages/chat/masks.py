"""A conversation's token ids and loss mask, through the checkpoint's own chat template: the text is the template's
rendering (the tokens transformers' apply_chat_template gives), and the trained tokens are found by rendering
prefixes, so any template works, with or without `{% generation %}` markers.

For each assistant turn i that trains:
- its header ends where the rendering of the turns before it with a generation prompt stops agreeing with the
  whole text: with reasoning on (`<|im_start|>assistant\\n<think>\\n`) or off (`...<think></think>`), whichever agrees
  longer, so a template-inserted empty `<think></think>` is part of the header and never trained;
- it ends with its end-of-turn token (`<|im_end|>`, else eos), which is trained; what the template adds after it
  (a newline before the next turn) is not;
- without reasoning loss, the reasoning up to and including `</think>` is not trained; in a trace cut by a thinking
  budget (`reasoning_truncated`), the `</think>` that closed it is not trained.

Templates that drop the reasoning of earlier turns (Nemotron's `truncate_history_thinking`) render a turn differently
once a later user turn follows. Such a turn trains in its own sample, the conversation up to the next user turn, where
the template renders it as the model would produce it (the split NVIDIA's Nemotron data preparation makes); the turns
of the whole conversation that render as they would at the end train in it. A sample's other turns are context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from model.errors import UserError
from model.tokenizer import END_THINK, EOS, IM_END, Tokenizer
from stages.chat.rows import Conversation, RowError

TRAIN_ON = ("assistant", "final", "all")
"""assistant: every assistant turn; final: the last one only; all: every token."""


@dataclass
class Sample:
    ids: np.ndarray
    """Token ids (int64)."""
    trained: np.ndarray
    """Per token, bool: it is a target (predicted from the tokens before it)."""
    prompt_key: str
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def conversation_samples(
    conversation: Conversation, tokenizer: Tokenizer, train_on: str = "assistant", reasoning_loss: bool = True,
    template_kwargs: dict | None = None,
) -> list[Sample]:
    """The training samples of one conversation (usually one, none without a turn to train; see the module
    docstring). RowError when the template cannot render it, or renders it so that no mask can be derived."""
    render = _Prefixes(tokenizer, conversation, template_kwargs or {})
    messages = conversation.messages
    if train_on == "all":
        return [_sample(tokenizer, render(len(messages)), None, conversation)]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "final":
        turns = turns[-1:]
    whole = render(len(messages))
    groups: dict[int, list[int]] = {}  # the sample's length in messages -> the turns it trains
    for i in turns:
        end = len(messages) if whole.startswith(render(i + 1)) else _next_user(messages, i)
        groups.setdefault(end, []).append(i)
    samples = []
    for end, group in sorted(groups.items()):
        text = render(end)
        spans = [_turn_span(render, i, text) for i in group]
        untrained = [u for i, span in zip(group, spans) for u in _untrained(messages[i], text, span, reasoning_loss)]
        samples.append(_sample(tokenizer, text, spans, conversation, untrained))
    return samples


class _Prefixes:
    """The conversation's first n messages in its chat template (with its tools and the caller's template kwargs),
    each rendering done once."""

    def __init__(self, tokenizer: Tokenizer, conversation: Conversation, template_kwargs: dict):
        self.tokenizer, self.conversation, self.kwargs = tokenizer, conversation, template_kwargs
        self.cache: dict[tuple, str] = {}
        eos = tokenizer.backend.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else EOS
        self.end_of_turn = IM_END if tokenizer.im_end_id is not None else eos

    def __call__(self, n: int, generation: bool = False, **switches) -> str:
        key = (n, generation, *sorted(switches.items()))
        if key not in self.cache:
            # No turn before an opening assistant turn: its header trains with it.
            self.cache[key] = self._render(n, generation, switches) if n else ""
        return self.cache[key]

    def _render(self, n: int, generation: bool, switches: dict) -> str:
        try:
            return self.tokenizer.render_chat(self.conversation.messages[:n], generation, self.conversation.tools,
                                              **(self.kwargs | switches))
        except UserError as err:
            raise RowError("messages", str(err)) from None


def _turn_span(render: _Prefixes, i: int, text: str) -> tuple[int, int]:
    """Characters of `text` that assistant turn i trains: after its header, through its end-of-turn token."""
    before, through = render(i), render(i + 1)
    if not text.startswith(before) or not text.startswith(through):
        raise RowError(f"messages[{i}]", "the chat template renders this turn differently once later turns follow; "
                                          "no loss mask can be derived")
    headers = [render(i, True, enable_thinking=on) for on in (True, False)] if i else [before]
    start = min(max(len(before), *(len(os.path.commonprefix([h, text])) for h in headers)), len(through))
    marker = text.find(render.end_of_turn, start, len(through))
    return start, marker + len(render.end_of_turn) if marker >= 0 else len(through)


def _untrained(message: dict, text: str, turn: tuple[int, int], reasoning_loss: bool) -> list[tuple[int, int]]:
    """Spans inside a trained turn that stay untrained: its reasoning (without reasoning loss), or the `</think>` a
    thinking budget forced."""
    if not message.get("reasoning_content"):
        return []
    close = text.find(END_THINK, *turn)
    if close < 0:  # the template left the reasoning out
        return []
    if not reasoning_loss:
        return [(turn[0], close + len(END_THINK))]
    return [(close, close + len(END_THINK))] if message.get("reasoning_truncated") else []


def _next_user(messages: list[dict], i: int) -> int:
    return next((j for j in range(i + 1, len(messages)) if messages[j]["role"] == "user"), len(messages))


def _sample(tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]] | None, conversation: Conversation,
            untrained: list[tuple[int, int]] = ()) -> Sample:
    """Tokenize `text`; the tokens that overlap a trained span (every token when spans is None) and no untrained one
    are trained."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]

    def overlapping(ranges) -> np.ndarray:
        hit = np.zeros(len(ids), dtype=bool)
        for a, b in ranges:
            hit |= (ends > a) & (starts < b)
        return hit

    trained = np.ones(len(ids), dtype=bool) if spans is None else overlapping(spans)
    trained &= ~overlapping(untrained)
    return Sample(ids, trained, conversation.prompt_key, conversation.origin)
