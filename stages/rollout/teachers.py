"""Teachers for on-policy distillation: each scores sampled replies token by token, log pi_T(y_t | s_t), under its own
full distribution (temperature 1, no truncation).

    teacher = load_teacher("math", "runs/cpu-rlvr-math", student_tokenizer, cfg)      # a checkpoint, in-process
    teacher = load_teacher("code", "http://gpu-7:8000", student_tokenizer, cfg)       # a server, over HTTP
    teacher.logprobs([(prompt_ids, reply_ids), ...])                                  # per reply token
    teacher.backend                                                                   # what it answers prompts with

A checkpoint teacher packs the sequences best-fit into rows isolated by seq_idx and runs its forward here; a server
teacher asks /v1/completions for prompt log-probs (`echo` with `logprobs`), as n3 serve and vLLM return them. Either
must share the student's tokenizer, or its log-probs would be of other tokens: a UserError says so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from kernels.cross_entropy import IGNORE
from model.checkpoint import from_pretrained, resolve_checkpoint
from model.errors import UserError
from model.tokenizer import Tokenizer
from presets.schema import RunConfig
from stages.chat.packing import best_fit_decreasing
from stages.rollout.backend import Backend, engine_backend
from stages.rollout.client import EndpointBackend
from stages.rollout.learner import PolicyObjective, Sampling

PROBE = "Teachers and students share one tokenizer: 12 + 30 = \\boxed{42}. <think>def f(x):</think>"
"""A text whose tokens a server teacher must spell as the student's tokenizer does."""


class Teacher(ABC):
    domain: str
    source: str
    """The checkpoint path or URL, for reports."""

    @abstractmethod
    def logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """For each (prompt ids, reply ids), the teacher's log-prob of every reply token given what precedes it."""

    @property
    @abstractmethod
    def backend(self) -> Backend:
        """The teacher as a generator (its warmup replies and its own held-out accuracy)."""


class CheckpointTeacher(Teacher):
    def __init__(self, domain: str, path: Path, cfg: RunConfig, warn, rows: int = 8, seq_len: int = 4096):
        self.domain, self.path = domain, path
        self.source = str(path)
        self.model = PolicyObjective(from_pretrained(path, dtype=torch.float32)).eval().requires_grad_(False)
        self.rows, self.seq_len = rows, seq_len
        self._cfg, self._warn, self._backend = cfg, warn, None

    @property
    def backend(self) -> Backend:
        if self._backend is None:  # an engine of its own, made when first asked for
            self._backend = engine_backend(self.path, self._cfg, self._warn, max_batch=self._cfg.mopd.engine_batch)
        return self._backend

    @torch.no_grad()
    def logprobs(self, sequences):
        lengths = [len(p) + len(r) for p, r in sequences]
        capacity = max([self.seq_len, *lengths])
        rows = best_fit_decreasing(lengths, capacity)
        out: list[list[float] | None] = [None] * len(sequences)
        for start in range(0, len(rows), self.rows):
            chunk = rows[start : start + self.rows]
            ids = torch.zeros(len(chunk), capacity, dtype=torch.long)
            targets = torch.full_like(ids, IGNORE)
            seq_idx = torch.zeros_like(ids)
            for r, row in enumerate(chunk):
                offset = 0
                for document, i in enumerate(row):
                    prompt, reply = sequences[i]
                    end = offset + len(prompt) + len(reply)
                    ids[r, offset:end] = torch.tensor(prompt + reply)
                    seq_idx[r, offset:end] = document
                    # Position j predicts token j + 1: the reply's tokens are predicted from the prompt's last on.
                    first = offset + len(prompt) - 1
                    targets[r, first : first + len(reply)] = torch.tensor(reply)
                    offset = end
                seq_idx[r, offset:] = len(row)
            logp = self.model(ids, targets, seq_idx, Sampling())["logp"].tolist()
            # Flattened in row-major order: rows in turn, each row's documents in the order they were placed.
            at = 0
            for row in chunk:
                for i in row:
                    n = len(sequences[i][1])
                    out[i], at = logp[at : at + n], at + n
        return out


class ServerTeacher(Teacher):
    def __init__(self, domain: str, url: str, tokenizer_path: Path, concurrency: int):
        self.domain, self.source = domain, url
        self.server = EndpointBackend(url, tokenizer_path, concurrency=concurrency)

    @property
    def backend(self) -> Backend:
        return self.server

    def logprobs(self, sequences):
        scores = self.server.score([p + r for p, r in sequences])
        # score() gives a value per token after the first: the reply's are the last len(reply).
        return [[s.logprob for s in scored[len(p) - 1 :]] for (p, _), scored in zip(sequences, scores)]

    def check_tokenizer(self, student: Tokenizer) -> None:
        """The server spells the probe's token ids as the student's tokenizer does (UserError otherwise)."""
        ids = student.encode(PROBE)
        if self.server.spell(ids) != [student.decode([i]) for i in ids]:
            raise UserError(f"the {self.domain} teacher at {self.source} spells tokens differently from the student's "
                            "tokenizer; a teacher must share the student's tokenizer")


def load_teacher(domain: str, source: str, student_path: Path, student: Tokenizer, cfg: RunConfig, warn) -> Teacher:
    """The teacher of `domain` from SOURCE (a checkpoint or run folder, or an http(s) URL), checked to share the
    student's tokenizer."""
    if source.startswith(("http://", "https://")):
        teacher = ServerTeacher(domain, source, student_path, concurrency=cfg.mopd.engine_batch)
        teacher.check_tokenizer(student)
        return teacher
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"the {domain} teacher {source} does not exist (give a checkpoint, a run folder or a URL)")
    path = resolve_checkpoint(path)
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"the {domain} teacher {path} has no tokenizer.json; a teacher must share the student's "
                        "tokenizer")
    theirs = Tokenizer.load(path)
    if theirs.backend.get_vocab(with_added_tokens=True) != student.backend.get_vocab(with_added_tokens=True):
        raise UserError(f"the {domain} teacher {path} has a different tokenizer from the student's; a teacher must "
                        "share the student's tokenizer")
    return CheckpointTeacher(domain, path, cfg, warn, rows=cfg.mopd.train.micro_batch_size,
                             seq_len=cfg.mopd.train.seq_len)
