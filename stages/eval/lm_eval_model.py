"""lm-evaluation-harness over an evaluation backend: `N3LM` is an `lm_eval` model (a TemplateLM, so lm-eval's own
context/continuation tokenization applies), and `run_lm_eval` runs tasks with it (REFERENCE.md section 6).

    run_lm_eval(backend, ["hellaswag"], include_path=None, limit=100)

Needs the eval extra (lm-eval). Log-likelihoods come from `Backend.score`, generations from `Backend.generate`
(greedy unless a task samples), so tasks run the same in-process or against an endpoint.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from model.errors import UserError
from stages.eval.perplexity import rolling_windows
from stages.rollout.backend import Backend

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the eval extra is missing; run_lm_eval says so
    TemplateLM = object


class N3LM(TemplateLM):
    def __init__(self, backend: Backend, max_length: int | None = None, max_gen_toks: int = 256):
        super().__init__()
        self.backend = backend
        self.tok = backend.tokenizer
        self.max_length = max_length or (backend.context or 2049) - 1
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.tok.pad_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return "n3-" + str(self.tok.vocab_size)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(chat_history, add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        sequences, counts = [], []
        for _, context, continuation in requests:
            whole = (context + continuation)[-self.max_length :]  # lm-eval's left truncation keeps the continuation
            sequences.append(whole)
            counts.append(min(len(continuation), len(whole) - 1))
        results = []
        for scores, n in zip(self._score(sequences), counts):
            tail = scores[len(scores) - n :]
            results.append((sum(s.logprob for s in tail), all(s.greedy for s in tail)))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood after the prefix token, in disjoint windows of max_length tokens that score all
        but their first (lm-eval's rolling windows; max_length counts every token a request holds)."""
        out = []
        for (text,) in (r.args for r in requests):
            ids = [self.prefix_token_id] + self.tok_encode(text)
            windows = rolling_windows(len(ids), self.max_length)
            scores = self._score([ids[start:end] for start, end, _ in windows])
            out.append(sum(s.logprob for (_, _, n), per in zip(windows, scores) for s in per[len(per) - n :]))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations, cut at the task's stop strings; requests with the
        same settings go to the backend together."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        prompts, limits = [], []
        for i, (context, kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or [self.tok.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            prompts.append(self.tok_encode(context)[-max(self.max_length - limit, 1) :])  # room for the answer
            limits.append(limit)
            groups[(tuple(until), temperature)].append(i)
        texts = [""] * len(requests)
        for (until, temperature), members in groups.items():
            answers = self.backend.generate([prompts[i] for i in members], [limits[i] for i in members],
                                            stop=list(until), temperature=temperature)
            for i, answer in zip(members, answers):
                for stop in until:  # a server may keep the stop string; lm-eval wants it cut
                    answer = answer.split(stop)[0]
                texts[i] = answer
        return texts

    def _score(self, sequences: list[list[int]]):
        out = []
        for start in range(0, len(sequences), self.backend.batch_size):
            out += self.backend.score(sequences[start : start + self.backend.batch_size])
        return out


def run_lm_eval(backend: Backend, tasks: list[str], include_path: Path | None = None, limit: float | None = None,
                num_fewshot: int | None = None, max_length: int | None = None, seed: int = 0,
                builtin_tasks: bool = True) -> dict:
    """lm_eval.simple_evaluate with N3LM; its results dict (per task metrics under "results"). builtin_tasks=False
    looks only under include_path (indexing lm-eval's own thousands of tasks takes seconds)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("n3 eval lm-eval needs lm-evaluation-harness: pip install 'n3[eval]'") from None
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=builtin_tasks)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(f"lm-eval knows no task {', '.join(unknown)}"
                        + ("" if include_path else " (a local task needs --include-path DIR with its YAML)"))
    results = lm_eval.simple_evaluate(
        model=N3LM(backend, max_length), tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return results
