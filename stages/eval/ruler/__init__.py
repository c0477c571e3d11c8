"""RULER (NVIDIA/RULER; REFERENCE.md section 6): 13 synthetic long-context tasks generated here, deterministically,
at lengths measured in the model's tokens; greedy answers scored by string matching.

    result = run_ruler(backend, RulerOptions(lengths=[4096, 8192], samples=500))
    result.scores["niah_single_1"][4096], result.mean(4096), result.summary()

qa_1 and qa_2 need SQuAD and HotpotQA files and are skipped (and reported so) without them. A length's score is the
mean over the tasks that ran.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from model.errors import UserError
from stages.eval.corpus import Corpus, builtin_corpus, folder_corpus
from stages.eval.ruler.aggregation import CommonWords, FrequentWords
from stages.eval.ruler.draft import Generator
from stages.eval.ruler.niah import Niah
from stages.eval.ruler.qa import QADataset, QuestionAnswering, read_hotpotqa, read_squad
from stages.eval.ruler.samples import Sample, task_samples
from stages.eval.ruler.scoring import clean
from stages.eval.ruler.tasks import TASKS
from stages.eval.ruler.tracking import VariableTracking
from stages.eval.ruler.words import word_lists
from stages.rollout.backend import Backend

__all__ = ["TASKS", "RulerOptions", "RulerResult", "Sample", "run_ruler", "samples"]


@dataclass
class RulerOptions:
    lengths: list[int]
    samples: int
    """Samples per task and length (RULER uses 500)."""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    seed: int = 42
    haystack: Path | None = None
    """A folder of .txt files for the essay haystack; None: the built-in corpus."""
    squad: Path | None = None
    hotpotqa: Path | None = None
    chat: bool = False
    """Wrap each prompt in the model's chat template (reasoning off) instead of sending it as plain text."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise UserError(f"unknown RULER task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
        if not self.lengths or min(self.lengths) < 1:
            raise UserError("give at least one positive length")
        if self.samples < 1:
            raise UserError(f"samples must be at least 1, got {self.samples}")

    def skip_reason(self, task: str) -> str | None:
        """Why a task cannot run (its dataset file was not given), or None."""
        dataset = TASKS[task].args.get("dataset")
        if dataset and getattr(self, dataset) is None:
            return f"no {'SQuAD' if dataset == 'squad' else 'HotpotQA'} file (--{dataset} FILE)"
        return None


class Sources:
    """What the generators draw on, loaded once per run and only when a task needs it."""

    def __init__(self, options: RulerOptions):
        self.options = options
        self._corpus: Corpus | None = None
        self._qa: dict[str, QADataset] = {}

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = folder_corpus(self.options.haystack) if self.options.haystack else builtin_corpus()
        return self._corpus

    @property
    def haystack(self) -> str | None:
        """The essay haystack's description, if a task used it."""
        return None if self._corpus is None else self._corpus.description

    def generator(self, task: str, length: int) -> Generator:
        spec = TASKS[task]
        args = spec.args
        if spec.family == "niah":
            corpus = self.corpus if args["haystack"] == "essay" else None
            return Niah(**args, words=word_lists(), corpus=corpus)
        if spec.family == "variable_tracking":
            return VariableTracking(args["chains"], args["hops"], length)
        if spec.family == "common_words_extraction":
            return CommonWords(word_lists().all, **args, length=length)
        if spec.family == "freq_words_extraction":
            return FrequentWords(args["alpha"], length)
        dataset = args["dataset"]
        if dataset not in self._qa:
            path = getattr(self.options, dataset)
            self._qa[dataset] = read_squad(path) if dataset == "squad" else read_hotpotqa(path)
        return QuestionAnswering(self._qa[dataset])


def samples(backend: Backend, options: RulerOptions, sources: Sources | None = None) -> Iterator[Sample]:
    """Every sample of the run, length by length, task by task (skipped tasks left out)."""
    sources = sources or Sources(options)
    chat = partial(backend.tokenizer.render_chat, enable_thinking=False) if options.chat else None
    for length in options.lengths:
        for task in options.tasks:
            if options.skip_reason(task) is None:
                yield from task_samples(task, sources.generator(task, length), TASKS[task].spec.tokens_to_generate,
                                        length, options.samples, options.seed, backend.encode, chat)


@dataclass
class RulerResult:
    backend: str
    haystack: str | None
    options: RulerOptions
    scores: dict[str, dict[int, float]]
    """task -> length -> mean score x 100."""
    lengths: dict[str, dict[int, float]]
    """task -> length -> mean tokens per sample (prompt + generation budget), to compare with the target."""
    skipped: dict[str, str]
    """task -> why it did not run."""
    predictions: list[dict]

    def mean(self, length: int) -> float:
        return sum(s[length] for s in self.scores.values()) / len(self.scores)

    def short(self, tolerance: float = 0.05) -> list[tuple[str, int, float]]:
        """(task, length, mean tokens) where samples fell more than `tolerance` short of the length (a source ran
        out: the word list, the QA documents)."""
        return [(t, n, m) for t, per in self.lengths.items() for n, m in per.items() if m < (1 - tolerance) * n]

    def summary(self) -> dict:
        o = self.options
        return {
            "benchmark": "ruler",
            "backend": self.backend,
            "haystack": self.haystack,
            "seed": o.seed,
            "samples_per_task": o.samples,
            "template": "chat" if o.chat else "base",
            "lengths": o.lengths,
            "tasks": {t: {"metric": TASKS[t].spec.metric.__name__, "scores": {str(n): s for n, s in v.items()},
                          "mean_tokens": {str(n): m for n, m in self.lengths[t].items()}}
                      for t, v in self.scores.items()},
            "skipped": self.skipped,
            "mean": {str(n): self.mean(n) for n in o.lengths},
            "tasks_in_mean": len(self.scores),
        }


def run_ruler(backend: Backend, options: RulerOptions, progress: Callable[[int], None] = lambda n: None) -> RulerResult:
    """Generate, answer and score every sample; `progress(k)` after each k answered."""
    if backend.context is not None and max(options.lengths) > backend.context:
        raise UserError(f"length {max(options.lengths)} exceeds the context the model is served with "
                        f"({backend.context} tokens)")
    sources = Sources(options)
    skipped = {t: r for t in options.tasks if (r := options.skip_reason(t)) is not None}
    if len(skipped) == len(options.tasks):
        raise UserError("every task was skipped: " + "; ".join(f"{t}: {r}" for t, r in skipped.items()))
    predictions = []
    stream = samples(backend, options, sources)
    while chunk := list(itertools.islice(stream, backend.batch_size)):
        answers = backend.generate([s.prompt for s in chunk], [s.max_tokens for s in chunk])
        for sample, answer in zip(chunk, answers):
            prediction = clean(answer)
            score = TASKS[sample.task].spec.metric(prediction, sample.answers)
            predictions.append({
                "task": sample.task, "length": sample.length, "index": sample.index,
                "prompt_tokens": len(sample.prompt), "answers": sample.answers, "prediction": prediction,
                "score": score, **sample.meta,
            })
        progress(len(chunk))
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for p in predictions:
        groups[p["task"], p["length"]].append(p)
    ran = [t for t in options.tasks if t not in skipped]
    scores = {t: {n: 100 * statistics.mean(p["score"] for p in groups[t, n]) for n in options.lengths} for t in ran}
    lengths = {t: {n: statistics.mean(p["prompt_tokens"] for p in groups[t, n]) + TASKS[t].spec.tokens_to_generate
                   for n in options.lengths} for t in ran}
    return RulerResult(backend.description, sources.haystack, options, scores, lengths, skipped, predictions)
