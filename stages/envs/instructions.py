"""The instructions domain: verifiable format rules, IFEval-style (REFERENCE.md section 4).

A problem is a small request ("Name some colors.") and one to three rules in plain words; its data lists the
rules as {"id", "kwargs"}, each checked by a predicate `check(text, **kwargs)`. The reward is the fraction of rules
followed, and it passes when all are. The reference answer lists words from the request's own small bank, chosen,
ordered and laid out to follow the rules ("Green, red, blue.", "- red\\n- blue", '{"answer": "Red, blue, green."}').

Levels:
    1  one rule of the simplest kinds (case, commas, first / last word, a keyword)
    2  one rule of any kind (also word counts, bullet lists, JSON, quotes, a word to avoid)
    3  two rules of any kinds
    4  three rules of any kinds
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from stages.envs.base import GeneratedTask, Problem, Score, Space

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
"""A word: letters and digits, with one inner apostrophe allowed (don't)."""


def words(text: str) -> list[str]:
    return WORD.findall(text)


def _has_word(text: str, word: str) -> bool:
    return word.lower() in (found.lower() for found in words(text))


def _first_word(text: str, word: str) -> bool:
    found = words(text)
    return bool(found) and found[0].lower() == word.lower()


def _last_word(text: str, word: str) -> bool:
    found = words(text)
    return bool(found) and found[-1].lower() == word.lower()


def _json_key(text: str, key: str) -> bool:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and key in value


def _quoted(text: str) -> bool:
    text = text.strip()
    return len(text) >= 2 and text[0] == text[-1] == '"'


@dataclass(frozen=True)
class Plan:
    """How a reference answer is built: which words of the bank, in what layout, finished how."""

    count: int = 3
    first: str | None = None
    last: str | None = None
    include: str | None = None
    exclude: str | None = None
    layout: str = "sentence"
    case: Callable[[str], str] | None = None
    wrap: Callable[[str], str] | None = None
    """Quotes or a JSON object around the finished text."""

    def items(self, bank: tuple[str, ...]) -> list[str] | None:
        """The words to list, or None when the rules ask for more fixed words than the count allows."""
        head = [word for word in (self.first, self.include) if word]
        tail = [self.last] if self.last else []
        room = self.count - len(head) - len(tail)
        if room < 0:
            return None
        rest = [word for word in bank if word not in (self.first, self.last, self.include, self.exclude)]
        return head + rest[:room] + tail

    def render(self, items: list[str]) -> str:
        text = LAYOUTS[self.layout](items)
        text = self.case(text) if self.case else text
        return self.wrap(text) if self.wrap else text


LAYOUTS = {
    "sentence": lambda items: ", ".join(items).capitalize() + ".",
    "plain": lambda items: " ".join(items).capitalize() + ".",
    "bullets": lambda items: "\n".join(f"- {item}" for item in items),
}


@dataclass(frozen=True)
class Kind:
    """One kind of rule. `say` (its words in the prompt) and `note` (in the reasoning) are formatted with the kwargs."""

    id: str
    check: Callable[..., bool]
    """check(text, **kwargs): the rule is followed."""
    say: str
    note: str
    shape: Callable[..., Plan]
    """shape(plan, **kwargs): the reference plan changed to follow the rule."""
    params: dict[str, type]
    values: tuple[dict, ...] = ({},)
    """The kwargs problems use; a "word" value is an index into the request's word bank."""
    conflicts: frozenset[str] = frozenset()
    """Groups (the id's part before the colon) a problem may not combine this kind with."""

    @property
    def group(self) -> str:
        return self.id.split(":")[0]


BANK_SIZE = 10
WORD_SLOTS = tuple({"word": i} for i in range(BANK_SIZE))
KINDS = {kind.id: kind for kind in (
    Kind("case:upper", lambda text: any(c.isalpha() for c in text) and text == text.upper(),
         "Write your whole answer in capital letters.", "every letter a capital",
         lambda plan: replace(plan, case=str.upper), {}),
    Kind("case:lower", lambda text: any(c.isalpha() for c in text) and text == text.lower(),
         "Write your whole answer in lowercase letters.", "no capital letters",
         lambda plan: replace(plan, case=str.lower), {}),
    Kind("punctuation:no_comma", lambda text: "," not in text, "Do not use any commas.", "no commas",
         lambda plan: replace(plan, layout="plain") if plan.layout == "sentence" else plan, {}),
    Kind("start:first_word", _first_word, "Start with the word {word}.", "the first word is {word}",
         lambda plan, word: replace(plan, first=word), {"word": str}, WORD_SLOTS),
    Kind("end:last_word", _last_word, "End with the word {word}.", "the last word is {word}",
         lambda plan, word: replace(plan, last=word), {"word": str}, WORD_SLOTS),
    Kind("keyword:include", _has_word, "Include the word {word}.", "use the word {word}",
         lambda plan, word: replace(plan, include=word), {"word": str}, WORD_SLOTS),
    Kind("keyword:exclude", lambda text, word: not _has_word(text, word), "Do not use the word {word}.",
         "never the word {word}", lambda plan, word: replace(plan, exclude=word), {"word": str}, WORD_SLOTS),
    Kind("words:at_most", lambda text, n: len(words(text)) <= n, "Use at most {n} words.", "at most {n} words",
         lambda plan, n: replace(plan, count=min(plan.count, n)), {"n": int}, tuple({"n": n} for n in range(2, 6))),
    Kind("words:at_least", lambda text, n: len(words(text)) >= n, "Use at least {n} words.", "at least {n} words",
         lambda plan, n: replace(plan, count=max(plan.count, n)), {"n": int}, tuple({"n": n} for n in range(4, 8))),
    Kind("words:exactly", lambda text, n: len(words(text)) == n, "Use exactly {n} words.", "exactly {n} words",
         lambda plan, n: replace(plan, count=n), {"n": int}, tuple({"n": n} for n in range(2, 7))),
    Kind("format:bullets", lambda text, n: sum(line.startswith("- ") for line in text.splitlines()) == n,
         "Answer with exactly {n} bullet points, each on a line starting with '- '.", "{n} lines starting with '- '",
         lambda plan, n: replace(plan, layout="bullets", count=n), {"n": int}, tuple({"n": n} for n in range(2, 6)),
         frozenset({"words"})),
    Kind("format:json_key", _json_key, 'Answer with a JSON object that has the key "{key}".',
         'a JSON object with the key "{key}"',
         lambda plan, key: replace(plan, wrap=lambda text: json.dumps({key: text})),
         {"key": str}, tuple({"key": key} for key in ("answer", "words", "items", "result")),
         frozenset({"case", "start", "end", "words"})),
    Kind("format:quoted", _quoted, "Wrap your whole answer in double quotes.", "double quotes around it all",
         lambda plan: replace(plan, wrap=lambda text: f'"{text}"'), {}),
)}
SIMPLE = ("case:upper", "case:lower", "punctuation:no_comma", "start:first_word", "end:last_word", "keyword:include")


@dataclass(frozen=True)
class Request:
    text: str
    bank: tuple[str, ...]
    """BANK_SIZE words that answer it, in the order the reference uses them."""


REQUESTS = tuple(Request(text, tuple(bank.split())) for text, bank in (
    ("Name some colors.", "red blue green yellow black white pink brown gray orange"),
    ("Name some animals.", "cat dog horse cow bird fish lion bear duck goat"),
    ("Name some fruits.", "apple pear plum grape lemon peach mango cherry melon lime"),
    ("Name some drinks.", "water tea coffee milk juice soda cocoa cider lemonade broth"),
    ("Name some tools.", "hammer saw drill wrench file knife rope ladder brush shovel"),
    ("Name some sports.", "soccer tennis golf rugby hockey boxing rowing skiing cycling swimming"),
    ("Name some jobs.", "doctor nurse baker farmer pilot teacher singer painter driver cook"),
    ("Name some birds.", "owl crow robin eagle hawk swan duck goose parrot pigeon"),
    ("Describe the sky.", "blue wide bright clear calm high open vast soft pale"),
    ("Describe the sea.", "deep blue cold wide salty calm dark wild green rough"),
    ("Describe the night.", "dark quiet cold calm long still deep black silent starry"),
    ("Describe a city.", "busy loud big bright crowded old tall modern dusty noisy"),
))

Option = tuple[Kind, dict]
ALL_OPTIONS: tuple[Option, ...] = tuple((kind, values) for kind in KINDS.values() for values in kind.values)
SIMPLE_OPTIONS = tuple(option for option in ALL_OPTIONS if option[0].id in SIMPLE)


def _compatible(options: tuple[Option, ...]) -> bool:
    """One rule per group, no declared conflict, and no bank word named by two rules."""
    groups = [kind.group for kind, _ in options]
    named = [values["word"] for _, values in options if "word" in values]
    clash = any(a.group in b.conflicts or b.group in a.conflicts
                for (a, _), (b, _) in itertools.combinations(options, 2))
    return len(set(groups)) == len(groups) and len(set(named)) == len(named) and not clash


def _build(level: int, request: Request, options: tuple[Option, ...]) -> Problem | None:
    if not _compatible(options):
        return None
    rules = [(kind, {name: request.bank[value] if name == "word" else value for name, value in values.items()})
             for kind, values in options]
    plan = Plan()
    for kind, kwargs in rules:
        plan = kind.shape(plan, **kwargs)
    items = plan.items(request.bank)
    if items is None:
        return None
    prompt = " ".join([request.text] + [kind.say.format(**kwargs) for kind, kwargs in rules])
    reasoning = f"Rules: {'; '.join(kind.note.format(**kwargs) for kind, kwargs in rules)}. Words: {', '.join(items)}."
    data = {"instructions": [{"id": kind.id, "kwargs": kwargs} for kind, kwargs in rules]}
    return Problem("instructions", level, prompt, reasoning, plan.render(items), data, key=prompt)


def _space(level: int, options: tuple[Option, ...], rules: int) -> Space:
    """Every request with `rules` distinct options, each set of options once (in the table's order)."""
    def build(request: Request, *picked: int) -> Problem | None:
        if any(a >= b for a, b in itertools.pairwise(picked)):
            return None
        return _build(level, request, tuple(options[i] for i in picked))

    return Space((REQUESTS,) + (range(len(options)),) * rules, build)


SPACES = {
    1: _space(1, SIMPLE_OPTIONS, 1),
    2: _space(2, ALL_OPTIONS, 1),
    3: _space(3, ALL_OPTIONS, 2),
    4: _space(4, ALL_OPTIONS, 3),
}


def check(instruction: dict, text: str) -> bool:
    """Whether `text` follows one {"id", "kwargs"} instruction; ValueError names an unknown id or bad kwargs."""
    id_ = instruction.get("id") if isinstance(instruction, dict) else None
    kind = KINDS.get(id_) if isinstance(id_, str) else None
    if kind is None:
        raise ValueError(f"unknown instruction {instruction!r}; the ids are {', '.join(KINDS)}")
    kwargs = instruction.get("kwargs", {})
    good = isinstance(kwargs, dict) and set(kwargs) == set(kind.params) and all(
        isinstance(kwargs[name], type_) and not isinstance(kwargs[name], bool) for name, type_ in kind.params.items())
    if not good:
        wanted = ", ".join(f"{name}: {type_.__name__}" for name, type_ in kind.params.items()) or "none"
        raise ValueError(f"instruction {kind.id} takes kwargs ({wanted}), got {kwargs!r}")
    return kind.check(text, **kwargs)


class InstructionsTask(GeneratedTask):
    name = "instructions"
    spaces = SPACES

    def score(self, data: dict, completion: str) -> Score:
        start = time.perf_counter()
        instructions = data.get("instructions")
        if not isinstance(instructions, list) or not instructions:
            raise ValueError(f"instructions data needs 'instructions', a list of {{id, kwargs}}; got {data!r}")
        results = [check(instruction, completion) for instruction in instructions]
        failed = [instruction["id"] for instruction, followed in zip(instructions, results) if not followed]
        followed = len(results) - len(failed)
        reason = f"{followed} of {len(results)} followed, not {', '.join(failed)}" if failed else "correct"
        return Score(sum(results) / len(results), not failed, reason, seconds=time.perf_counter() - start)
