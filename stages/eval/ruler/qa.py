"""Question answering over many documents (RULER `qa.py`): the question's gold documents hidden among distractors
(for SQuAD, first the other paragraphs of the same article). qa_1 reads SQuAD (v2.0 dev JSON: unanswerable
questions are skipped), qa_2 HotpotQA (the distractor-setting dev JSON). Sample i asks question i."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError
from stages.eval.ruler.draft import Draft, Generator
from stages.eval.ruler.tasks import FAMILIES

DOCUMENT = "Document {i}:\n{document}"


@dataclass
class Question:
    query: str
    answers: list[str]
    gold: list[int]
    """Indices of the documents that hold the answer."""
    nearby: list[int]
    """Distractors chosen first (SQuAD: the article's other paragraphs)."""


@dataclass
class QADataset:
    questions: list[Question]
    documents: list[str]


def _load(path: Path, name: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--{name} {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--{name} {path}: not a JSON file ({err})") from None


def read_squad(path: Path) -> QADataset:
    data = _load(path, "squad")
    try:
        articles = data["data"]
        documents = sorted({p["context"] for a in articles for p in a["paragraphs"]})
        index = {doc: i for i, doc in enumerate(documents)}
        questions = []
        for article in articles:
            paragraphs = [index[p["context"]] for p in article["paragraphs"]]
            for p in article["paragraphs"]:
                for qa in p["qas"]:
                    if not qa.get("is_impossible", False):
                        doc = index[p["context"]]
                        questions.append(Question(qa["question"], [a["text"] for a in qa["answers"]], [doc],
                                                  [d for d in paragraphs if d != doc]))
    except (KeyError, TypeError) as err:
        raise UserError(f"--squad {path}: not SQuAD JSON (data/paragraphs/qas; missing {err})") from None
    if not questions:
        raise UserError(f"--squad {path}: no answerable questions")
    return QADataset(questions, documents)


def read_hotpotqa(path: Path) -> QADataset:
    data = _load(path, "hotpotqa")
    try:
        def doc(title: str, sents: list[str]) -> str:
            return f"{title}\n{''.join(sents)}"

        documents = sorted({doc(t, s) for item in data for t, s in item["context"]})
        index = {d: i for i, d in enumerate(documents)}
        questions = [Question(item["question"], [item["answer"]], [index[doc(t, s)] for t, s in item["context"]], [])
                     for item in data]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"--hotpotqa {path}: not HotpotQA JSON (question/answer/context; {err})") from None
    if not questions:
        raise UserError(f"--hotpotqa {path}: no questions")
    return QADataset(questions, documents)


@dataclass
class QuestionAnswering(Generator):
    """n units = distractor documents beside the gold ones."""

    dataset: QADataset

    def __post_init__(self) -> None:
        self.max_units = len(self.dataset.documents) - max(len(q.gold) for q in self.dataset.questions)

    def make(self, n: int, rng: random.Random, index: int) -> Draft:
        question = self.dataset.questions[index % len(self.dataset.questions)]
        chosen = question.gold + rng.sample(question.nearby, min(n, len(question.nearby)))
        if len(chosen) < len(question.gold) + n:
            taken = set(chosen)
            others = [d for d in range(len(self.dataset.documents)) if d not in taken]
            chosen += rng.sample(others, min(len(others), len(question.gold) + n - len(chosen)))
        rng.shuffle(chosen)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=self.dataset.documents[d]) for i, d in enumerate(chosen))
        family = FAMILIES["qa"]
        return Draft(family.template.format(context=context, query=question.query), family.answer_prefix,
                     question.answers, {"gold": [chosen.index(d) + 1 for d in question.gold]})
