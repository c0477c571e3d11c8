"""From conversations to the packed rows a stage trains on, for every stage that fine-tunes on chats (sft, mopd's
warmup): chat sources or the built-in tasks -> a held-out share -> the reasoning mix -> samples with loss masks in the
checkpoint's template -> sources interleaved and packed best-fit.

    data = build_chat_data(tokenizer, ChatDataOptions(seq_len=4096), sources)     # or sources=None, suite={...}
    data.train, data.val, data.summary()
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from model.errors import UserError
from model.tokenizer import Tokenizer
from stages.chat.masks import Sample, conversation_samples
from stages.chat.packing import PackedRows, PackingStats, interleave, pack
from stages.chat.reasoning import ReasoningMix
from stages.chat.rows import Conversation, RowError
from stages.chat.sources import ChatSource, held_out, read_source
from stages.envs.suite import suite_problems
from stages.runtime.progress import Progress, Quiet

VALIDATION_PROBLEMS = 32
"""Held-out problems per built-in domain for the validation loss."""


@dataclass
class ChatDataOptions:
    seq_len: int
    """Tokens per packed row."""
    seed: int = 0
    train_on: str = "assistant"
    """assistant | final | all (stages.chat.masks)."""
    reasoning_loss: bool = True
    reasoning: ReasoningMix = field(default_factory=ReasoningMix)
    problems: int = 3000
    """Training problems per domain of the built-in tasks."""
    val_fraction: float = 0.02
    """Share of the conversations of chat sources held out for the validation loss."""


@dataclass
class SourceReport:
    name: str
    weight: float
    conversations: int
    samples: int
    tokens: int


@dataclass
class ChatData:
    """What training reads, and how it was made."""

    train: PackedRows
    val: PackedRows | None
    sources: list[SourceReport]
    modes: dict[str, int]
    """Conversations per reasoning mode (on, off, truncated, without)."""
    bad_rows: int = 0
    """Malformed rows skipped (skip_bad)."""
    nothing_to_train: int = 0
    """Conversations skipped because no token of theirs takes a loss (no assistant turn to train)."""

    @property
    def fingerprint(self) -> str:
        """A digest of the training rows: a resumed run must see the same data."""
        digest = hashlib.sha256()
        for array in (self.train.input_ids, self.train.labels, self.train.seq_idx):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        return {"sources": [asdict(s) for s in self.sources], "reasoning_modes": self.modes,
                "bad_rows_skipped": self.bad_rows, "nothing_to_train": self.nothing_to_train,
                "packing": asdict(self.train.stats) | {"efficiency": self.train.stats.efficiency},
                "validation_rows": len(self.val) if self.val is not None else 0}


def build_chat_data(
    tokenizer: Tokenizer, options: ChatDataOptions, sources: list[ChatSource] | None = None,
    suite: dict[str, list[int] | None] | None = None, skip_bad: bool = False, progress: Progress | None = None,
) -> ChatData:
    """The training and validation rows of chat `sources`, or (sources None) of the built-in tasks of `suite`
    (stages.envs.suite: their train split to train, their test split to validate). A malformed row or one the
    template cannot render is a UserError naming it, unless skip_bad (then counted)."""
    progress = progress or Quiet()
    bad = 0
    if sources is None:
        train_sets = {d: [_conversation(p, f"builtin {d}") for p in ps]
                      for d, ps in suite_problems(suite or {}, "train", options.problems, options.seed).items()}
        val_sets = {d: [_conversation(p, f"builtin {d} (test)") for p in ps]
                    for d, ps in suite_problems(suite or {}, "test", VALIDATION_PROBLEMS, options.seed + 1).items()}
        weights = dict.fromkeys(train_sets, 1.0)
    else:
        train_sets, val_sets, weights = {}, {}, {}
        for source in sources:
            conversations, skipped = read_source(source, skip_bad)
            bad += skipped
            val_sets[source.name] = [c for c in conversations if held_out(c, options.val_fraction)]
            train_sets[source.name] = [c for c in conversations if not held_out(c, options.val_fraction)]
            weights[source.name] = source.weight
    modes: dict[str, int] = {}
    samples: dict[str, list[Sample]] = {}
    empty = 0
    progress.start("rendering conversations", total=sum(map(len, train_sets.values())))
    for i, (name, conversations) in enumerate(train_sets.items()):
        mixed, counts = options.reasoning.apply(conversations, seed=options.seed * 1000 + i)
        modes = {k: modes.get(k, 0) + v for k, v in counts.items()}
        samples[name], nothing, skipped = _samples(mixed, tokenizer, options, skip_bad, progress)
        empty, bad = empty + nothing, bad + skipped
    val = [s for conversations in val_sets.values() for s in _samples(conversations, tokenizer, options, skip_bad)[0]]
    stream = interleave(list(samples.values()), [weights[n] for n in samples], options.seed)
    rows = pack(stream, options.seq_len, tokenizer.pad_id)
    _check_masks(rows.stats, options.train_on)
    reports = [SourceReport(name, weights[name], len(train_sets[name]), len(s), sum(map(len, s)))
               for name, s in samples.items()]
    return ChatData(rows, pack(val, options.seq_len, tokenizer.pad_id) if val else None, reports, modes, bad, empty)


def _samples(conversations: list[Conversation], tokenizer: Tokenizer, options: ChatDataOptions, skip_bad: bool,
             progress: Progress | None = None) -> tuple[list[Sample], int, int]:
    """(samples, conversations with nothing to train, bad conversations skipped)."""
    samples, nothing, bad = [], 0, 0
    for conversation in conversations:
        try:
            made = conversation_samples(conversation, tokenizer, options.train_on, options.reasoning_loss)
        except RowError as err:
            if not skip_bad:
                raise UserError(f"{conversation.origin}: {err} (--skip-bad skips such rows)") from None
            bad += 1
            continue
        made = [s for s in made if s.trained[1:].any()]
        nothing += not made
        samples += made
        if progress is not None:
            progress.advance(1)
    return samples, nothing, bad


def _check_masks(stats: PackingStats, train_on: str) -> None:
    """A mask of no tokens, or (training on assistant turns) of every token, means it was derived wrong."""
    if not stats.trained:
        raise UserError("no token of the packed data takes a loss: no conversation has an assistant turn to train "
                        "(or every one is longer than the rows)")
    if train_on != "all" and stats.trained >= stats.tokens - stats.samples:
        raise UserError(f"every token takes a loss although only {train_on} turns should: the chat template's turns "
                        "could not be told apart (check the checkpoint's chat template)")


def _conversation(problem, origin: str) -> Conversation:
    return Conversation(problem.messages(), origin=origin, meta={"domain": problem.domain, "level": problem.level})
