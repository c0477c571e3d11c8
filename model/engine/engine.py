"""The engine: continuous batching over a HybridCache, chunked prefill, sampling, MTP self-speculation.

Each `step()`:
1. admits waiting requests while cache rows are free;
2. decodes every request past its prompt in one forward: the pending token plus, with speculation, k MTP drafts;
   verifies the drafts (greedy or rejection sampling), keeps the accepted ones, rewinds KV lengths and Mamba
   states of each row to its last accepted token, and (speculation) writes the MTP cache at the kept positions and
   drafts the next k tokens (model.engine.step, model.engine.drafting);
3. spends what is left of `max_step_tokens` on prompt chunks of the requests still prefilling, oldest first (rows
   with the same prompt, such as the samples of one RL prompt, are fed once and count once); rows that finish their
   prompt get their first token and, with speculation, their first drafts;
4. returns one Delta per request that produced something, and frees the rows of finished requests.

With `EngineConfig(compile=True)` the decode step (model.engine.step: the forward, the verification and sampling, the
drafting) runs as one torch.compile graph with a dynamic batch dimension and Inductor's C++ wrapper
(COMPILE_OPTIONS), and so does the backbone over a prompt chunk of one row shorter than an SSD chunk (`_prompt_forward`);
other prefill runs eagerly.

`load_weights` swaps in new weights (a trainer's, between rollouts) by copying them into the model's own tensors:
the caches, their rows and the compiled graphs stay as they are (compiled code reads the parameters when it runs).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.cache import HybridCache
from model.checkpoint import from_pretrained
from model.engine import drafting
from model.engine.params import EngineConfig, SamplingParams
from model.engine.reasoning import Thinking
from model.engine.sampling import Draws, StepLogprobs, logprobs_of, step_logprobs, verify
from model.engine.sequence import Completion, Delta, Sequence
from model.engine.step import decode_step
from model.errors import UserError
from model.hybrid import NemotronH
from model.tokenizer import Tokenizer

SSM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RELOAD_MAY_CHANGE = ("initializer_range", "rescale_prenorm_residual", "time_step_min", "time_step_max",
                     "time_step_floor", "max_position_embeddings")
"""ModelConfig fields a reloaded checkpoint may change: how weights were initialised, and max_position_embeddings
(NoPE: it bounds caches, which the engine has sized already)."""


RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per compiled function (its default is 8). Every engine of a process shares the caches of
the functions it compiles (they are keyed by the code), and each draft depth, cache size and batch kind (one row or
several) is a graph of its own: `n3 eval mtp` builds an engine per draft length and batch size, a dozen graphs of the
drafting alone, and past the limit dynamo falls back to eager code without saying more than a warning."""

COMPILE_OPTIONS = {"cpp_wrapper": True}
"""Inductor options of the decode-step graphs. The C++ wrapper calls each graph's kernels from C++ rather than
Python: a decode step of a small model is a few hundred tiny kernels. Measured on the tiny shape (CPU, 2 threads,
batch 1, 64 greedy tokens, engines with and without it interleaved in one process): plain decoding about 12% faster,
the same cold compile time of warm_up."""


class PromptTooLong(ValueError):
    """The prompt (plus max_tokens) does not fit the engine's context length."""


@dataclass
class EngineStats:
    """Counters since the engine started (what a server exports as metrics)."""

    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    """Finished requests by finish_reason."""
    decode_rows: int = 0
    """Sum over steps of the requests decoded together (mean batch size = decode_rows / decode_steps)."""
    decode_steps: int = 0
    proposed: list[int] = field(default_factory=list)
    """Per draft depth: drafts verified."""
    accepted: list[int] = field(default_factory=list)
    """Per draft depth: drafts the verification accepted (as vLLM counts them: also those a stop or max_tokens then
    cut off, so acceptance measures the drafts' quality, not how a request ended)."""

    @property
    def mean_batch(self) -> float:
        return self.decode_rows / max(self.decode_steps, 1)

    @property
    def acceptance_rate(self) -> list[float]:
        """Per draft depth: the fraction of drafts accepted."""
        return [a / max(p, 1) for a, p in zip(self.accepted, self.proposed)]

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verification (accepted drafts + the target's own token); 1.0 without speculation."""
        return 1 + sum(self.accepted) / max(self.decode_rows, 1)


class Engine:
    """Serve many requests at once from one model, in-process.

        engine = Engine(model, tokenizer, EngineConfig(max_batch=8, speculative_tokens=3))
        [c.text for c in engine.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))]
        engine.chat([[{"role": "user", "content": "hi /no_think"}]], SamplingParams(max_tokens=64))
        for delta in engine.stream([1, 2, 3], SamplingParams(max_tokens=8)): print(delta.token_ids)
        engine.loglikelihood([(context_ids, continuation_ids)])  # [(sum of log-probs, is greedy)]

    Lower level, for a server or a trainer driving many requests: `submit` (returns a request id), `step` (one
    iteration; returns Deltas), `abort`, `has_work`. Prompts are token ids, text (needs a tokenizer) or chat messages
    (`submit(messages=...)`: the tokenizer's chat template; the chat end token stops). A trainer swaps in its new
    weights with `load_weights(checkpoint or state dict)` between steps; `weights_version` counts them.
    Not thread-safe: one thread drives it (model.engine.background runs it for servers).
    """

    def __init__(self, model: NemotronH, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.k = config.speculative_tokens
        if self.k and model.mtp is None:
            raise ValueError("speculative decoding drafts with the MTP head; this model has none")
        if self.k and "M" in cfg.mtp_pattern:
            raise ValueError("speculative decoding supports MTP blocks without Mamba sublayers (Nemotron 3: '*E')")
        self.max_len = config.max_len or cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.device = model.lm_head.weight.device
        dtype = model.lm_head.weight.dtype
        room = self.max_len + self.k + 1  # verification and drafting write up to k positions past the last token
        self.cache = HybridCache(
            cfg, config.max_batch, room, dtype, self.device, SSM_DTYPES[config.ssm_dtype],
            config.stochastic_rounding, config.seed,
        )
        self.mtp_cache = (
            HybridCache(cfg, config.max_batch, room, dtype, self.device, pattern=cfg.mtp_pattern) if self.k else None
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.stats = EngineStats(proposed=[0] * self.k, accepted=[0] * self.k)
        self.weights_version = 0
        """Which weights generate: 0 for those the engine started with, then as load_weights sets it."""
        self._seeds = random.Random(config.seed)
        self._ids = itertools.count()
        self._newline: dict[int, bool] = {}
        # The decode step, compiled when asked, and short prompt chunks of one row (_prompt_forward). The drafting of
        # rows that finish their prompt (or that the thinking budget moved) runs apart from the decode step.
        self._step = _compiled(decode_step) if config.compile else decode_step
        self._short_prompt = _compiled(model.model) if config.compile else None
        self._drafts = {
            prompt: _compiled(draft) if config.compile and self.k else draft
            for prompt, draft in ((False, drafting.mtp_draft), (True, drafting.prompt_draft))
        }

    # --- requests ---------------------------------------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int] | str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request: `prompt` (token ids or text) or `messages` (chat, rendered by the tokenizer's chat
        template with `tools` and `template_kwargs` such as enable_thinking). Returns its id. Raises ValueError for an
        invalid request (PromptTooLong when it does not fit the context) before anything is queued."""
        return self.add(self.make_request(prompt, params, messages=messages, tools=tools,
                                          template_kwargs=template_kwargs, request_id=request_id))

    def make_request(
        self,
        prompt: list[int] | str | None = None,
        params: SamplingParams | None = None,
        *,
        messages: list[dict] | None = None,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
        request_id: str | None = None,
    ) -> Sequence:
        """Check and tokenize a request without queueing it (safe from another thread); `add` queues it. A chat
        reply whose prompt opens a thought (`<think>\\n`) comes back with its reasoning apart."""
        params = params or SamplingParams()
        params.validate(self.vocab_size)
        if (prompt is None) == (messages is None):
            raise ValueError("give either a prompt or chat messages")
        if (messages is not None or isinstance(prompt, str) or params.stop) and self.tokenizer is None:
            raise ValueError("text prompts, chat messages and stop strings need an engine with a tokenizer")
        tok = self.tokenizer
        thinking = None
        stop_ids = set(params.stop_token_ids)
        if messages is not None:
            try:
                text = tok.render_chat(messages, add_generation_prompt=True, tools=tools, **(template_kwargs or {}))
            except UserError as err:
                raise ValueError(str(err)) from None
            ids = tok.encode(text)
            if not params.ignore_eos:
                stop_ids |= {t for t in (tok.im_end_id, tok.eos_id) if t is not None}
            if tok.opens_thought(text):
                thinking = Thinking(tok.end_think_id, params.max_thinking_tokens, params.thinking_grace, self._has_newline)
        else:
            ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
            if not params.ignore_eos and tok is not None and tok.eos_id is not None:
                stop_ids.add(tok.eos_id)
        if not ids:
            raise ValueError("the prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        max_tokens = self.max_len - len(ids) if params.max_tokens is None else params.max_tokens
        if len(ids) + max(max_tokens, 1 if params.max_tokens is None else 0) > self.max_len:
            raise PromptTooLong(
                f"this model's context is {self.max_len} tokens; the prompt has {len(ids)}"
                + (f" and max_tokens asks for {params.max_tokens} more" if params.max_tokens else "")
            )
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        generator = torch.Generator().manual_seed(seed % (1 << 63))  # any integer seed, negative or huge
        request_id = request_id or f"req-{next(self._ids)}"
        return Sequence(request_id, ids, params, max_tokens, stop_ids, tok, generator, thinking)

    def add(self, seq: Sequence) -> str:
        """Queue a request made by make_request."""
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        return seq.request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its last Delta (finish_reason "abort") comes from the next step. Unknown ids are ignored."""
        seq = self.requests.get(request_id)
        if seq is not None:
            seq.finish("abort")

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    # --- weights ----------------------------------------------------------------------------------------------------
    def read_weights(self, path: str | Path) -> dict[str, torch.Tensor]:
        """The tensors of a checkpoint folder (HF format, as n3 writes it; quantized ones decoded) on the CPU, checked
        to fit this engine's model, for `load_weights`. Safe from another thread. UserError for a checkpoint that
        cannot be read or whose config differs from the model's (beyond RELOAD_MAY_CHANGE)."""
        loaded = from_pretrained(path)
        old, new = dataclasses.asdict(self.model.config), dataclasses.asdict(loaded.config)
        changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k] and k not in RELOAD_MAY_CHANGE]
        if changed:
            raise UserError(f"{path} does not fit the model being served: {', '.join(changed)}")
        return loaded.state_dict()

    def load_weights(self, source: str | Path | Mapping[str, torch.Tensor], version: int | None = None) -> int:
        """Replace the model's weights in place with a checkpoint folder's (see read_weights) or a state dict's (the
        model's own keys and shapes, any dtype or device), and set weights_version to `version` (default: one more).
        Returns the new version. Runs between steps with no request running (RuntimeError otherwise: finish or abort
        them first; requests still waiting for a row start with the new weights). A source that does not fit raises
        UserError before anything is copied: the old weights stay."""
        if self.running:
            raise RuntimeError(f"{len(self.running)} requests are running; let them finish or abort them before "
                               "loading weights")
        state = self.read_weights(source) if isinstance(source, (str, Path)) else source
        target = self.model.state_dict()  # views of the parameters and buffers themselves
        problems = _misfits(target, state)
        if problems:
            raise UserError(f"the weights do not fit the model: {'; '.join(problems)}")
        with torch.no_grad():
            for key, tensor in target.items():
                tensor.copy_(state[key])  # in place: the compiled graphs read these very tensors
        self.weights_version = self.weights_version + 1 if version is None else version
        return self.weights_version

    def cache_usage(self) -> dict[str, float]:
        """rows, rows_in_use, token_fraction (positions holding tokens / positions), bytes (KV, states, MTP cache)."""
        rows = len(self.cache.lengths)
        held = sum(s.prefilled + len(s.tokens) for s in list(self.running) if s.slot is not None)
        caches = [self.cache] + ([self.mtp_cache] if self.mtp_cache is not None else [])
        return {"rows": rows, "rows_in_use": self.cache.rows_in_use, "token_fraction": held / (rows * self.max_len),
                "bytes": sum(c.nbytes() for c in caches)}

    # --- the loop ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Delta]:
        """One iteration of the batch (see the module docstring). Returns the Deltas of this step."""
        self._admit()
        decoding = [s for s in self.running if s.decoding]
        if decoding:
            self._decode(decoding)
        budget = self.config.max_step_tokens - len(decoding) * (1 + self.k)
        chunks: dict[int, list[Sequence]] = {}  # prompt chunks of equal length run as one forward
        scheduled: dict[tuple, int] = {}  # a row's twin (same prompt, as far fed) comes along at no cost: _prefill
        for seq in [s for s in self.running if s.prompt_left and s.finish_reason is None]:
            twin = (seq.prefilled, seq.prompt_key)
            if twin in scheduled:
                chunks[scheduled[twin]].append(seq)
            elif budget > 0:
                n = scheduled[twin] = min(budget, seq.prompt_left)
                chunks.setdefault(n, []).append(seq)
                budget -= n
        for n, seqs in chunks.items():
            self._prefill(seqs, n)
        self.stats.steps += 1
        return self._collect()

    def _admit(self) -> None:
        for seq in [s for s in self.waiting if s.finish_reason is not None]:  # aborted while waiting
            self.waiting.remove(seq)
            self.running.append(seq)  # only to hand out its last delta
        while self.waiting and self.cache.free:
            seq = self.waiting.popleft()
            seq.weights_version = self.weights_version
            seq.slot = self.cache.take()
            if self.mtp_cache is not None:
                self.mtp_cache.reset(seq.slot)
            self.running.append(seq)

    def _collect(self) -> list[Delta]:
        deltas = []
        for seq in list(self.running):
            delta = seq.delta()
            if delta is not None:
                deltas.append(delta)
            if seq.finish_reason is not None:
                self.running.remove(seq)
                del self.requests[seq.request_id]
                if seq.slot is not None:
                    self.cache.release(seq.slot)
                self.stats.finished[seq.finish_reason] = self.stats.finished.get(seq.finish_reason, 0) + 1
                self.stats.generated_tokens += len(seq.tokens)
        return deltas

    def _prefill(self, seqs: list[Sequence], n: int) -> None:
        """Feed the next n prompt tokens of each sequence; those that finish their prompt get their first token.
        Rows with the same prompt, fed as far (the samples of one prompt, as RL draws them), are fed once: the
        first of them runs the forward and the others copy its cache row and hidden states."""
        starts = [s.prefilled for s in seqs]
        first: dict[tuple, int] = {}
        source = [first.setdefault((i, s.prompt_key), row) for row, (s, i) in enumerate(zip(seqs, starts))]
        unique = list(first.values())  # in row order
        ids = torch.tensor([seqs[row].prompt[starts[row] : starts[row] + n] for row in unique], device=self.device)
        h = self._prompt_forward(ids, [seqs[row] for row in unique])
        self.cache.advance(n)
        if len(unique) < len(seqs):
            copies = [row for row in range(len(seqs)) if source[row] != row]
            self.cache.copy_rows([seqs[source[row]].slot for row in copies], [seqs[row].slot for row in copies])
            position = {row: i for i, row in enumerate(unique)}
            h = h[[position[row] for row in source]]
        # The token after each fed position, where the prompt knows it.
        following = [s.prompt[i + 1 : i + n + 1] for s, i in zip(seqs, starts)]
        for row, seq in enumerate(seqs):
            seq.prefilled += n
            self.stats.prompt_tokens += n
            if seq.prompt_logprobs is not None:
                logits = self.model.logits(h[row, : len(following[row])])
                targets = torch.tensor(following[row], device=self.device)
                seq.prompt_logprobs += logprobs_of(logits, targets, seq.params.prompt_logprobs)
        for seq in seqs:
            if not seq.prompt_left and seq.max_tokens == 0:  # scoring only
                seq.finish("length")
        done = [row for row, s in enumerate(seqs) if not s.prompt_left and s.finish_reason is None]
        if done:
            first = [seqs[row] for row in done]
            draws = self._draws(first, 1 + self.k)  # the first token's uniform, then the drafts'
            logits = self.model.logits(h[done, -1:])
            nothing = torch.zeros(len(done), 0, dtype=torch.long, device=self.device)
            self._append(first, logits, *verify(nothing, logits, None, draws))
            for row in done:
                following[row] = following[row] + seqs[row].tokens[-1:]
        if self.k:
            alive = [row for row, s in enumerate(seqs) if s.finish_reason is None]

            def mtp_inputs(rows: list[int]) -> tuple[list[Sequence], torch.Tensor, torch.Tensor, torch.Tensor]:
                tokens = torch.tensor([following[row] for row in rows], device=self.device)
                return [seqs[row] for row in rows], h[rows], tokens, torch.full((len(rows),), n, device=self.device)

            # Rows still prefilling only write their MTP positions; those that finished their prompt draft too.
            prefilling, ready = [r for r in alive if r not in done], [r for r in alive if r in done]
            if prefilling:
                rows, hidden, tokens, kept = mtp_inputs(prefilling)
                drafting.mtp_positions(self.model, hidden, tokens, kept, self._select(self.mtp_cache, rows, compiled=False))
            if ready:
                drafting_draws = None if draws is None else draws.rows([done.index(r) for r in ready]).after(1)
                self._draft(*mtp_inputs(ready), drafting_draws, prompt=True)

    def _prompt_forward(self, ids: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The backbone's hiddens (b, n, d) over the prompt chunk ids (b, n) of seqs. A chunk of one row, 2 to
        chunk_size - 1 tokens long, runs compiled when the engine compiles: one graph for every such length (the SSD
        scan's loop over chunks would make a graph per chunk count, and dynamo one for a length of 1). Measured on the
        tiny shape (CPU, 2 threads, 32 tokens): 2.0 ms compiled against 8.5 ms eager for one row, where eager code
        spends its time dispatching small ops; a batch of rows has work enough per op that compiled code gains nothing
        (16 rows: 18.7 against 18.5 ms; 64 rows of 50 tokens: 106 against 80 ms)."""
        if self._short_prompt is not None and len(seqs) == 1 and 2 <= ids.shape[1] < self.model.config.chunk_size:
            self._dynamic(ids, dims=(1,))
            return self._short_prompt(ids, self._select(self.cache, seqs))
        return self.model.model(ids, self._select(self.cache, seqs, compiled=False))

    def _decode(self, seqs: list[Sequence]) -> None:
        k = self.k
        fed = torch.tensor([s.tokens[-1:] + s.drafts for s in seqs], device=self.device)  # (b, 1 + k)
        cache = self._select(self.cache, seqs, keep_positions=k > 0)
        mtp_cache = self._select(self.mtp_cache, seqs) if k else None
        draws = self._draws(seqs, 2 * k + 1)
        draft_probs = None
        if draws is not None and k:
            nothing = torch.zeros(k, self.vocab_size, device=self.device)  # a greedy row's, never read
            draft_probs = torch.stack([nothing if s.draft_probs is None else s.draft_probs for s in seqs])
        self._dynamic(fed, cache, mtp_cache, draft_probs, draws)
        step = self._step(self.model, k, fed, cache, mtp_cache, draft_probs, draws)
        self.cache.advance(1 + k)
        accepted, kept, proposals = self._append(seqs, step.logits, step.accepted, step.final, step.sampling)
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(seqs)
        for depth in range(k):
            self.stats.proposed[depth] += len(seqs)
            self.stats.accepted[depth] += sum(a > depth for a in accepted)
        if not k:
            return
        self.cache.rewind(kept, 1 + k)
        alive = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        if not alive:
            return
        drafts, probs = step.drafts, step.draft_probs
        if len(alive) < len(seqs):
            drafts, probs = drafts[alive], None if probs is None else probs[alive]
        self._set_drafts([seqs[i] for i in alive], drafts, probs)
        # A forced `</think>` replaced the last token these rows kept: the step drafted from the token it replaced
        # (and gave the MTP cache accepted + 1 positions). Draft again from what they kept.
        moved = [i for i in alive if seqs[i].tokens[-1] != proposals[i][kept[i] - 1]]
        if moved:
            rows = [seqs[i] for i in moved]
            self.mtp_cache.lengths[[s.slot for s in rows]] -= torch.tensor([accepted[i] + 1 for i in moved],
                                                                           device=self.device)
            following = [seqs[i].tokens[-kept[i] :] + [0] * (1 + k - kept[i]) for i in moved]
            self._draft(rows, step.hidden[moved], torch.tensor(following, device=self.device),
                        torch.tensor([kept[i] for i in moved], device=self.device),
                        None if draws is None else draws.rows(moved).after(k + 1))

    # --- MTP drafting -----------------------------------------------------------------------------------------------
    def _draft(
        self, seqs: list[Sequence], h: torch.Tensor, following: torch.Tensor, kept: torch.Tensor,
        draws: Draws | None, prompt: bool = False,
    ) -> None:
        """Write the MTP positions of main hiddens h (b, t, d) and the tokens following them (b, t), keeping kept[i]
        (b,) of row i, and draft k tokens for each row from its last kept position with draws (uniforms (b, k)): one
        compiled graph when asked (for a prompt chunk, one whose t may vary)."""
        cache = self._select(self.mtp_cache, seqs)
        self._dynamic(h, following, dims=(0, 1) if prompt else (0,))
        self._dynamic(kept, cache, draws)
        self._set_drafts(seqs, *self._drafts[prompt](self.model, self.k, h, following, kept, cache, draws))

    def _draws(self, seqs: list[Sequence], n: int) -> Draws | None:
        """How seqs sample, with n uniforms a row, each sampled row's from its request's own generator (so a seed
        fixes a request's samples); None when every row is greedy."""
        if all(s.params.greedy for s in seqs):
            return None
        uniforms = torch.zeros(len(seqs), n)
        for row, seq in enumerate(seqs):
            if not seq.params.greedy:
                uniforms[row] = torch.rand(n, generator=seq.generator)
        return Draws.of([s.params for s in seqs], uniforms.to(self.device))

    def _set_drafts(self, seqs: list[Sequence], tokens: torch.Tensor, probs: torch.Tensor | None) -> None:
        """Hand each row its drafts (b, k) and, for a row that samples, their distributions (b, k, V)."""
        for seq, row, p in zip(seqs, tokens.tolist(), probs if probs is not None else [None] * len(seqs)):
            seq.drafts = row
            seq.draft_probs = None if seq.params.greedy else p

    # --- compiled decode --------------------------------------------------------------------------------------------
    def _select(
        self, cache: HybridCache, seqs: list[Sequence], keep_positions: bool = False, compiled: bool = True
    ) -> HybridCache:
        """Select the rows of seqs; compiled forwards get an index tensor (one kind of selection for every batch)."""
        return cache.select([s.slot for s in seqs], keep_positions, index=compiled and self.config.compile)

    def _dynamic(self, *inputs, dims: tuple[int, ...] = (0,)) -> None:
        """Mark dims (the batch) of a compiled call's inputs as dynamic, so one graph serves every batch size
        (dynamo still specialises a size of 1): tensors, a cache's row selection, the tensors of Draws; None skipped."""
        if not self.config.compile:
            return
        for x in inputs:
            if isinstance(x, HybridCache):
                x = x.active
            if isinstance(x, Draws):
                self._dynamic(*x.tensors)
            elif isinstance(x, torch.Tensor):
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(x, dim)

    # --- sampling ---------------------------------------------------------------------------------------------------
    def _append(
        self, seqs: list[Sequence], logits: torch.Tensor, accepted: torch.Tensor, final: torch.Tensor,
        sampling: torch.Tensor | None,
    ) -> tuple[list[int], list[int], list[list[int]]]:
        """Append each row's verified tokens (its first accepted[i] drafts, then final[i]) with their log-probabilities
        from logits (b, 1 + k, V) and the sampling log-probabilities (as `verify` returns them). Returns per row the
        drafts accepted, the tokens kept (a request may end, or the thinking budget replace a token) and the tokens
        proposed."""
        accepted, final = torch.stack([accepted, final]).tolist()
        proposals = [s.drafts[:a] + [f] for s, a, f in zip(seqs, accepted, final)]
        reported = self._logprobs(seqs, logits, sampling, proposals)
        kept = [s.append(tokens, lp) for s, tokens, lp in zip(seqs, proposals, reported)]
        return accepted, kept, proposals

    def _logprobs(
        self, seqs: list[Sequence], logits: torch.Tensor, sampling: torch.Tensor | None, proposals: list[list[int]]
    ) -> list[StepLogprobs | None]:
        """Per row that reports log-probabilities, those of its proposed tokens under the distribution it reports
        (SamplingParams.logprobs_mode: the raw model's, or the sampling distribution of a row that samples); None for
        the other rows."""
        rows = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        reported: list[StepLogprobs | None] = [None] * len(seqs)
        if not rows:
            return reported
        processed = [i for i in rows if seqs[i].params.logprobs_mode == "processed" and not seqs[i].params.greedy]
        if processed == rows:
            logp = sampling if len(rows) == len(seqs) else sampling[rows]
        else:
            logp = torch.log_softmax(logits[rows].float(), -1)
            if processed:
                logp[[rows.index(i) for i in processed]] = sampling[processed]
        t = logits.shape[1]
        tokens = torch.tensor([proposals[i] + [0] * (t - len(proposals[i])) for i in rows])
        for i, entry in zip(rows, step_logprobs(logp, tokens, [seqs[i].params.logprobs for i in rows])):
            reported[i] = entry
        return reported

    def _has_newline(self, token: int) -> bool:
        if token not in self._newline:
            self._newline[token] = "\n" in self.tokenizer.decode([token])
        return self._newline[token]

    def warm_up(self) -> None:
        """Run each decode shape once (batches of one and two, with speculation when on) and a one-row prompt chunk,
        so that a compiled engine compiles now rather than while its first requests wait. The warm-up requests are
        not counted in stats."""
        params = SamplingParams(temperature=0, max_tokens=min(self.k + 3, self.max_len - 2), ignore_eos=True)
        for batch in (1, 2)[: self.config.max_batch]:
            self.generate([[0, 0]] * batch, params)  # two tokens: a row's short prompt compiles too
        self.stats = EngineStats(proposed=[0] * self.k, accepted=[0] * self.k)

    # --- conveniences -----------------------------------------------------------------------------------------------
    def run(self, request_ids: list[str]) -> list[Completion]:
        """Step until the given requests finish (others progress alongside); their Completions, in order."""
        seqs = [self.requests[r] for r in request_ids]
        while any(r in self.requests for r in request_ids):
            self.step()
        return [s.completion() for s in seqs]

    def generate(
        self, prompts: list[list[int] | str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Complete every prompt (token ids or text), batched; one SamplingParams for all or one per prompt."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        return self.run([self.submit(p, sp) for p, sp in zip(prompts, per_prompt)])

    def chat(
        self, conversations: list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
        tools: list[dict] | None = None, **template_kwargs,
    ) -> list[Completion]:
        """Answer every conversation (OpenAI-style messages) through the tokenizer's chat template, with its
        template_kwargs (enable_thinking, ...); reasoning comes apart in Completion.reasoning."""
        per_chat = params if isinstance(params, list) else [params] * len(conversations)
        return self.run([self.submit(messages=m, params=sp, tools=tools, template_kwargs=template_kwargs)
                         for m, sp in zip(conversations, per_chat)])

    def stream(self, prompt: list[int] | str, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Deltas of one request as they are produced (other queued requests progress alongside)."""
        request_id = self.submit(prompt, params)
        while True:
            for delta in self.step():
                if delta.request_id == request_id:
                    yield delta
                    if delta.finish_reason is not None:
                        return

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): log P(continuation | context) under the model, and whether the
        continuation is what greedy decoding would produce (lm-eval's loglikelihood)."""
        params = SamplingParams(max_tokens=0, prompt_logprobs=1)
        if any(not context for context, _ in pairs):
            raise ValueError("each context needs at least one token (the first token has no log-probability)")
        done = self.run([self.submit(list(context) + list(cont), params) for context, cont in pairs])
        results = []
        for (context, _), completion in zip(pairs, done):
            scored = completion.prompt_logprobs[len(context) :]
            results.append((sum(t.logprob for t in scored), all(t.top[0][0] == t.token_id for t in scored)))
        return results


def _compiled(forward):
    """forward through torch.compile with COMPILE_OPTIONS, its calls (and so its compilations) under RECOMPILE_LIMIT;
    the process's other compiled code keeps dynamo's own limit."""
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)(torch.compile(forward, options=COMPILE_OPTIONS))


def _misfits(target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading into `target`: missing and unexpected keys, other shapes (a few of each)."""
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    shapes = [f"{k} is {tuple(state[k].shape)}, not {tuple(t.shape)}"
              for k, t in target.items() if k in state and state[k].shape != t.shape]
    named = {"missing": missing, "unexpected": unexpected, "other shapes": shapes}
    return [f"{len(items)} {kind} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
            for kind, items in named.items() if items]
