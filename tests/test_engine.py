"""The inference engine against the model itself: greedy decoding equals a naive full-forward argmax loop under
continuous batching and chunked prefill; MTP speculation changes nothing under greedy (drafts up to 7 deep, the Mamba
state in fp32 or fp16) and keeps the model's distribution under sampling; a verification's Mamba span equals decode
steps; logprobs (raw and of the sampling distribution), stops, seeds, cancellation, reasoning budget and the tokens it
forces, low-precision SSM state, weights reloaded in place."""

import copy
import dataclasses
import math
import random
import threading

import pytest
import torch

import model as n3
from kernels import ssd_span, ssd_step
from model.cache import HybridCache
from model.engine import Completion, Engine, EngineConfig, PromptTooLong, SamplingParams
from model.engine.background import BackgroundEngine
from model.engine.engine import RECOMPILE_LIMIT, _compiled
from model.engine.reasoning import Thinking
from model.engine.sampling import filtered_probs, sample
from model.errors import UserError
from model.mamba2 import Mamba2Mixer
from tests.test_kernels import ssd_inputs
from tests.test_model import tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def random_model(vocab_size: int = 64, seed: int = 0, scale: float = 8.0, **overrides) -> n3.NemotronH:
    """A tiny model with MTP whose weights are scaled up, so its next-token distributions are peaked enough for
    greedy outputs that vary with the context (the default init is nearly uniform)."""
    torch.manual_seed(seed)
    built = n3.build(tiny_config(vocab_size=vocab_size, **overrides)).eval()
    with torch.no_grad():
        for p in built.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return built


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def small_vocab():
    """Six tokens: MTP drafts of a random model are often right, so acceptance and rejection both happen."""
    return random_model(vocab_size=6, scale=5.0)


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[1, 2, 3, 4, 5], [7] * 11, [9, 3], list(range(20, 37)), [5, 40, 41, 2, 8, 8, 30, 1, 9]]


def test_greedy_equals_naive_loop_with_joins_and_chunked_prefill(model):
    """Three cache rows for six requests (later ones join as others finish, reusing rows), prompt chunks of at most
    four tokens per step, different max_tokens, and one request submitted while the others are mid-flight."""
    lengths = [12, 5, 9, 12, 3]
    engine = Engine(model, config=EngineConfig(max_batch=3, max_len=40, max_step_tokens=7))
    ids = [engine.submit(p, SamplingParams(temperature=0, max_tokens=n)) for p, n in zip(PROMPTS, lengths)]
    for _ in range(4):
        engine.step()
    late = [3, 14, 15, 9, 26, 50, 61]
    ids.append(engine.submit(late, SamplingParams(temperature=0, max_tokens=10)))
    done = engine.run(ids)
    for prompt, n, completion in zip(PROMPTS + [late], lengths + [10], done):
        assert completion.token_ids == naive_greedy(model, prompt, n)
        assert completion.finish_reason == "length"
    assert engine.stats.mean_batch > 1.5 and sorted(engine.cache.free) == [0, 1, 2]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_speculative_greedy_equals_plain_greedy(small_vocab, k):
    prompts = [[1, 2, 3], [4, 4, 0, 1, 5, 2, 3], [0], [5, 1, 1, 2]]
    params = SamplingParams(temperature=0, max_tokens=20)
    plain = Engine(small_vocab, config=EngineConfig(max_batch=3, max_len=32)).generate(prompts, params)
    # A step budget of three prompt tokens beside three decoding rows: at k = 1 the long prompt prefills in two
    # chunks, the first beside a row that drafts.
    config = EngineConfig(max_batch=3, max_len=32, speculative_tokens=k, max_step_tokens=3 * (1 + k) + 3)
    engine = Engine(small_vocab, config=config)
    spec = engine.generate(prompts, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    stats = engine.stats
    assert stats.proposed == [stats.decode_rows] * k
    assert stats.accepted[0] > 0 and stats.accepted[0] < stats.proposed[0]  # both paths taken
    assert all(a >= b for a, b in zip(stats.accepted, stats.accepted[1:]))  # depth j needs depth j-1
    steps_saved = sum(len(c.token_ids) for c in spec) - stats.decode_rows - len(prompts)
    assert math.isclose(stats.mean_acceptance_length, 1 + steps_saved / stats.decode_rows) and steps_saved > 0


CLEAR_PROMPTS = [[3, 3, 0, 2, 4, 3, 3], [0, 5, 2, 3, 4, 0], [2, 5, 0, 4, 2], [3, 0, 0]]
"""Prompts whose 20 greedy tokens under small_vocab hold no near-tie: the top two logits lie 0.02 apart at least, far
beyond what rounding the Mamba state to fp16 moves them (elsewhere a tie of 5e-5 may go either way)."""


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("ssm_dtype", ["fp32", "fp16"])
def test_deep_drafts_keep_greedy_output(small_vocab, ssm_dtype, k):
    """Drafts that are plain greedy's own continuation, wrong from a random depth on (or not at all): verification
    accepts and rejects at every depth up to k, rewinding the Mamba states to each, and the output stays plain
    greedy's, with the state in fp32 and in fp16 with stochastic rounding (the default)."""
    params = SamplingParams(temperature=0, max_tokens=20)
    for prompt in CLEAR_PROMPTS:
        top2 = full_forward_logits(small_vocab, prompt, naive_greedy(small_vocab, prompt, 20)).topk(2).values
        assert (top2[:, 0] - top2[:, 1]).min() > 0.02
    config = EngineConfig(max_batch=3, max_len=32, ssm_dtype=ssm_dtype)
    plain = [c.token_ids for c in Engine(small_vocab, config=config).generate(CLEAR_PROMPTS, params)]
    engine = Engine(small_vocab, config=dataclasses.replace(config, speculative_tokens=k))
    truth = {tuple(p): tokens + [0] * k for p, tokens in zip(CLEAR_PROMPTS, plain)}
    wrong_from = random.Random(0)
    set_drafts = engine._set_drafts

    def oracle_drafts(seqs, tokens, probs):
        set_drafts(seqs, tokens, probs)  # the MTP cache as drafting leaves it; only the drafts change
        for seq in seqs:
            seq.drafts = truth[tuple(seq.prompt)][len(seq.tokens) : len(seq.tokens) + k]
            wrong = wrong_from.randrange(k + 1)
            if wrong < k:
                seq.drafts[wrong] = (seq.drafts[wrong] + 1) % small_vocab.config.vocab_size

    engine._set_drafts = oracle_drafts
    assert [c.token_ids for c in engine.generate(CLEAR_PROMPTS, params)] == plain
    assert all(0 < a < p for a, p in zip(engine.stats.accepted, engine.stats.proposed))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_ssd_span_equals_successive_steps(dtype, tolerance):
    """ssd_span over 8 positions: the outputs and the state after every position of 8 ssd_step calls."""
    x, dt, A, B, C, D, state = (v.to(dtype) for v in ssd_inputs(t=8))
    y, states = ssd_span(state, x, dt, A, B, C, D)
    assert y.dtype == states.dtype == dtype and states.shape == (2, 8, 6, 4, 5)
    for i in range(8):
        y_i, state = ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D)
        torch.testing.assert_close(y[:, i], y_i, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(states[:, i], state, rtol=tolerance, atol=tolerance)


def random_mamba_mixer() -> tuple[n3.ModelConfig, Mamba2Mixer]:
    """A Mamba-2 mixer of the tiny shape with weights normal(0, 0.3): states that move visibly step to step."""
    torch.manual_seed(0)
    cfg = tiny_config(pattern="M")
    mixer = Mamba2Mixer(cfg).eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(std=0.3)
    return cfg, mixer


@pytest.mark.parametrize("ssm_dtype", [torch.float32, torch.float16])
def test_verification_keeps_the_state_after_every_position(ssm_dtype):
    """A forward of 6 tokens keeping positions gives the outputs of 6 decode steps, and rewinding each row to its kept
    positions leaves the states those steps left there (fp16 with stochastic rounding: within its rounding)."""
    cfg, mixer = random_mamba_mixer()
    rows, t = 3, 6
    g = torch.Generator().manual_seed(1)
    prefix, fed = torch.randn(rows, 5, cfg.hidden_size, generator=g), torch.randn(rows, t, cfg.hidden_size, generator=g)
    stepped, spanned = (HybridCache(cfg, rows, 16, ssm_dtype=ssm_dtype, stochastic_rounding=True, seed=s) for s in (3, 4))
    tolerance = 1e-5 if ssm_dtype == torch.float32 else 1e-2
    with torch.no_grad():
        for cache in (stepped, spanned):
            mixer(prefix, cache.layers[0])
        outputs, states = [], []
        for i in range(t):
            outputs.append(mixer(fed[:, i : i + 1], stepped.layers[0]))
            states.append((stepped.layers[0].conv.clone(), stepped.layers[0].ssm.float().clone()))
        out = mixer(fed, spanned.select(keep_positions=True).layers[0])
    torch.testing.assert_close(out, torch.cat(outputs, 1), rtol=tolerance, atol=tolerance)
    assert spanned.layers[0].history[1].dtype == ssm_dtype
    kept = [1, 4, 6]
    spanned.rewind(kept, t)
    for row, n in enumerate(kept):
        conv, ssm = states[n - 1]
        torch.testing.assert_close(spanned.layers[0].conv[row], conv[row], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(spanned.layers[0].ssm[row].float(), ssm[row], rtol=tolerance, atol=tolerance)


def exact_joint(model, prompt: list[int]) -> torch.Tensor:
    """P(t1, t2 | prompt) over the whole (tiny) vocabulary, from full forwards."""
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        v = first.shape[0]
        second = model(torch.tensor([prompt + [a] for a in range(v)]))[:, -1].softmax(-1)
    return (first[:, None] * second).flatten()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat.double() / 2))


@pytest.mark.parametrize("k", [0, 2])
def test_sampled_tokens_follow_the_model_distribution(small_vocab, k):
    """Pairs of sampled tokens against the exact joint distribution (36 cells, 3000 seeded samples). With k = 2
    the second token passes through MTP drafting and rejection sampling."""
    prompt, n = [1, 2, 3], 3000
    engine = Engine(small_vocab, config=EngineConfig(max_batch=200, max_len=8, speculative_tokens=k))
    done = engine.generate([prompt] * n, [SamplingParams(max_tokens=2, seed=i) for i in range(n)])
    counts = torch.zeros(36, dtype=torch.float64)
    for c in done:
        counts[c.token_ids[0] * 6 + c.token_ids[1]] += 1
    assert chi_square_p_value(counts, exact_joint(small_vocab, prompt).double()) > 0.001
    if k:
        assert 0 < engine.stats.accepted[0] < engine.stats.proposed[0]


def test_a_seed_fixes_the_sample_whatever_the_batch(model):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=1234)
    alone = Engine(model, config=EngineConfig(max_batch=4, max_len=40)).generate([PROMPTS[0]], params)[0]
    crowd = Engine(model, config=EngineConfig(max_batch=4, max_len=40)).generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [SamplingParams(max_tokens=10, seed=1), params, SamplingParams(seed=2)]
    )[1]
    assert alone.token_ids == crowd.token_ids


def test_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]] * 3)
    probs = filtered_probs(logits, torch.tensor([1.0, 1.0, 0.5]), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.8, 1.0]))
    full = logits[0].softmax(-1)
    torch.testing.assert_close(probs[0, :2], full[:2] / full[:2].sum())
    assert torch.all(probs[0, 2:] == 0)
    # top_p 0.8: the smallest prefix whose mass reaches 0.8 (here the first three tokens).
    assert (probs[1] > 0).sum() == 3 and full[:2].sum() < 0.8 <= full[:3].sum()
    torch.testing.assert_close(probs[2], (logits[2] / 0.5).softmax(-1))
    # Inverse-CDF draws never pick a token of probability 0.
    draws = sample(probs[0].expand(1000, -1), torch.rand(1000))
    assert set(draws.tolist()) == {0, 1}


def test_logprobs_and_prompt_logprobs_match_the_full_forward(model):
    prompt = PROMPTS[3]
    engine = Engine(model, config=EngineConfig(max_batch=2, max_len=40, max_step_tokens=2 + 5))  # chunked prompt
    c = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2))[0]
    ids = prompt + c.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(prompt)
    scored = c.prompt_logprobs[1:] + c.logprobs
    for position, entry in enumerate(scored):
        assert entry.token_id == ids[position + 1]
        assert math.isclose(entry.logprob, reference[position, entry.token_id].item(), abs_tol=1e-4)
        top_ids = [t for t, _ in entry.top]
        assert top_ids == reference[position].topk(len(top_ids)).indices.tolist()
    assert all(len(e.top) == 3 for e in c.logprobs) and all(len(e.top) == 2 for e in c.prompt_logprobs[1:])
    assert all(e.top[0][0] == e.token_id for e in c.logprobs)  # greedy: the chosen token is the top one


@pytest.mark.parametrize("step_tokens", [40, 12])
def test_samples_of_one_prompt_share_its_prefill(model, monkeypatch, step_tokens):
    """Four samples of one prompt and one of another, the prompts fed whole or in chunks: the shared prompt's tokens
    run through the model once (and count once against a step's budget), and every sample continues from the copied
    cache row as if it had fed the prompt itself: its tokens' log-probs are those of a full forward over prompt and
    reply."""
    engine = Engine(model, config=EngineConfig(max_batch=5, max_len=48, max_step_tokens=step_tokens))
    fed = []
    forward = engine._prompt_forward
    monkeypatch.setattr(engine, "_prompt_forward", lambda ids, seqs: fed.append(ids.numel()) or forward(ids, seqs))
    prompts = [PROMPTS[3]] * 4 + [PROMPTS[4]]
    params = [SamplingParams(temperature=1.0, max_tokens=8, logprobs=0, seed=seed) for seed in range(5)]
    done = engine.generate(prompts, params)
    assert sum(fed) == len(PROMPTS[3]) + len(PROMPTS[4])
    assert len({tuple(c.token_ids) for c in done[:4]}) > 1
    for prompt, completion in zip(prompts, done):
        ids = prompt + completion.token_ids
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
        for position, entry in enumerate(completion.logprobs, start=len(prompt) - 1):
            assert math.isclose(entry.logprob, reference[position, entry.token_id].item(), abs_tol=1e-4)


def test_loglikelihood(model):
    context = PROMPTS[0]
    greedy = naive_greedy(model, context, 3)
    other = [(greedy[0] + 1) % 64] + greedy[1:]
    engine = Engine(model, config=EngineConfig(max_batch=2, max_len=40))
    (lp_greedy, is_greedy), (lp_other, not_greedy) = engine.loglikelihood([(context, greedy), (context, other)])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context + other]))[0], -1)
    expected = sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(other))
    assert is_greedy and not not_greedy and lp_greedy > lp_other
    assert math.isclose(lp_other, expected, abs_tol=1e-4)


def test_stop_token_ids_and_max_tokens(model):
    engine = Engine(model, config=EngineConfig(max_batch=2, max_len=40))
    free = engine.generate([PROMPTS[0]], GREEDY)[0]
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    stopped = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert free.finish_reason == "length" and len(free.token_ids) == 12


@pytest.fixture(scope="module")
def text_model(tokenizer):
    return random_model(vocab_size=tokenizer.vocab_size, scale=4.0), tokenizer


def test_stop_strings_cut_the_text_and_streaming_holds_them_back(text_model):
    model, tokenizer = text_model
    engine = Engine(model, tokenizer, EngineConfig(max_batch=2, max_len=64))
    prompt = "The grass is green."
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    assert free.text == tokenizer.decode(free.token_ids, skip_special=True) and len(free.text) > 8
    stop = free.text[5:8]
    params = SamplingParams(temperature=0, max_tokens=24, stop=[stop, "never appears"])
    stopped = engine.generate([prompt], params)[0]
    assert stopped.text == free.text[: free.text.index(stop)]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    deltas = list(engine.stream(prompt, params))
    assert "".join(d.text for d in deltas) == stopped.text and deltas[-1].finish_reason == "stop"


def test_abort_frees_the_row_and_others_finish(model):
    engine = Engine(model, config=EngineConfig(max_batch=2, max_len=40))
    keep = engine.submit(PROMPTS[0], GREEDY)
    drop = engine.submit(PROMPTS[1], GREEDY)
    queued = engine.submit(PROMPTS[2], GREEDY)  # waits for a row
    for _ in range(3):
        engine.step()
    engine.abort(drop)
    engine.abort(queued)
    deltas = engine.step()
    finished = {d.request_id: d.finish_reason for d in deltas if d.finish_reason}
    assert finished == {drop: "abort", queued: "abort"}
    assert engine.run([keep])[0].token_ids == naive_greedy(model, PROMPTS[0], 12)
    assert not engine.has_work and sorted(engine.cache.free) == [0, 1]


def test_thinking_budget_rule():
    newline = {7}
    thinking = Thinking(end_id=99, budget=3, grace=2, has_newline=lambda t: t in newline)
    for token in [1, 7]:  # a newline before the budget does not end the thought
        thinking.observe(token)
        assert not thinking.force_end
    thinking.observe(2)  # the budget is reached on a token without a newline
    assert not thinking.force_end
    thinking.observe(7)  # ... and the next newline ends the thought
    assert thinking.force_end
    graceless = Thinking(end_id=99, budget=2, grace=2, has_newline=lambda t: False)
    for token in [1, 2, 3]:
        graceless.observe(token)
        assert not graceless.force_end
    graceless.observe(4)  # budget 2 + grace 2, no newline: forced anyway
    assert graceless.force_end
    graceless.observe(99)
    assert not graceless.active and not graceless.force_end
    assert Thinking(end_id=99, budget=0, grace=5, has_newline=lambda t: False).force_end


def test_chat_reasoning_budget_and_split(text_model):
    model, tokenizer = text_model
    engine = Engine(model, tokenizer, EngineConfig(max_batch=2, max_len=96, speculative_tokens=2))
    messages = [{"role": "user", "content": "Where is the sun?"}]
    params = SamplingParams(temperature=0, max_tokens=30, max_thinking_tokens=4, thinking_grace=3, ignore_eos=True)
    c = engine.chat([messages], params)[0]
    end = c.token_ids.index(tokenizer.end_think_id)
    assert 4 <= end <= 7  # the budget, then at most the grace
    assert c.reasoning == tokenizer.decode(c.token_ids[:end], skip_special=True)
    assert c.text == tokenizer.decode(c.token_ids[end + 1 :], skip_special=True)
    off = engine.chat([[{"role": "user", "content": "Where is the sun? /no_think"}]], SamplingParams(max_tokens=5))[0]
    assert off.reasoning is None and tokenizer.end_think_id not in off.token_ids[:1]


def test_invalid_requests_are_refused_before_queueing(model):
    engine = Engine(model, config=EngineConfig(max_batch=2, max_len=16))
    with pytest.raises(PromptTooLong):
        engine.submit(list(range(10)), SamplingParams(max_tokens=7))
    with pytest.raises(PromptTooLong):
        engine.submit(list(range(16)))
    for bad in [dict(prompt=[]), dict(prompt=[64]), dict(prompt="text needs a tokenizer"),
                dict(prompt=[1], params=SamplingParams(top_p=0)), dict(prompt=[1], params=SamplingParams(temperature=-1))]:
        with pytest.raises(ValueError):
            engine.submit(**bad)
    assert not engine.has_work
    with pytest.raises(ValueError, match="MTP"):
        Engine(random_model(pattern="M*E"), config=EngineConfig(speculative_tokens=2))


def test_background_engine_serves_threads(model):
    background = BackgroundEngine(Engine(model, config=EngineConfig(max_batch=3, max_len=40))).start()
    results: dict[int, list] = {}
    done = threading.Event()

    def on_delta(i):
        def receive(delta):
            results.setdefault(i, []).extend(delta.token_ids)
            if delta.finish_reason and len([r for r in results.values()]) == len(PROMPTS):
                done.set()
        return receive

    threads = [threading.Thread(target=background.submit, args=(on_delta(i), p, GREEDY)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    background.stop(drain=True, timeout=60)  # returns once every request in flight has finished
    assert [results[i] for i in range(len(PROMPTS))] == [naive_greedy(model, p, 12) for p in PROMPTS]
    with pytest.raises(RuntimeError):
        background.submit(lambda d: None, PROMPTS[0], GREEDY)


def test_fp16_stochastic_rounding_stays_closer_to_fp32():
    """A Mamba state that decays slowly (dt |A| = 1e-4) under coherent inputs: each step's change is below half an
    fp16 ulp of the state, so round-to-nearest drifts; stochastic rounding stays unbiased."""
    cfg, mixer = random_mamba_mixer()
    with torch.no_grad():
        mixer.A_log.fill_(math.log(0.1))
        mixer.dt_bias.fill_(math.log(math.expm1(1e-3)))
    steps, rows = 2500, 8
    g = torch.Generator().manual_seed(1)
    inputs = 0.3 * torch.randn(steps, rows, 1, cfg.hidden_size, generator=g) + torch.randn(rows, 1, cfg.hidden_size, generator=g)

    def final_state(dtype, stochastic):
        cache = HybridCache(cfg, rows, 4, ssm_dtype=dtype, stochastic_rounding=stochastic, seed=3)
        with torch.no_grad():
            for u in inputs:
                mixer(u, cache.layers[0])
        return cache.layers[0].ssm.float()

    reference = final_state(torch.float32, False)
    error = {sr: ((final_state(torch.float16, sr) - reference).norm() / reference.norm()).item() for sr in (False, True)}
    assert error[True] < 0.7 * error[False]


def test_compiled_decode_equals_eager(small_vocab):
    """torch.compile'd decode steps (verification keeping per-position Mamba states, then the drafting: the MTP
    block over the kept positions, the draws and the recursive depth) produce the eager tokens, for a greedy row and
    a seeded sampled one in the same batch, and after load_weights the new model's. Eight steps of two rows: one
    batch shape. The prompts' lengths differ, so each is a prompt chunk of one row (compiled too)."""
    limit = torch._dynamo.config.recompile_limit
    prompts = [[1, 2, 3, 4], [5, 0, 2]]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=40, seed=7, ignore_eos=True)]  # one batch shape: fewer graphs
    tokens = []
    for compiled in (False, True):
        config = EngineConfig(max_batch=2, max_len=48, speculative_tokens=2, compile=compiled)
        engine = Engine(copy.deepcopy(small_vocab), config=config)  # a copy: load_weights below writes into it
        ids = [engine.submit(p, q) for p, q in zip(prompts, params)]
        for _ in range(8):
            engine.step()
        tokens.append([engine.requests[i].tokens for i in ids])
    assert tokens[0] == tokens[1] and len(tokens[1][1]) >= 8
    assert tokens[1][0] == naive_greedy(small_vocab, prompts[0], len(tokens[1][0])) and len(tokens[1][0]) >= 8
    # Engines of many draft depths stay compiled; the process's other compiled code keeps dynamo's limit.
    assert _compiled(lambda: torch._dynamo.config.recompile_limit)() == RECOMPILE_LIMIT != limit
    for request_id in ids:  # new weights: the compiled step reads them (parameters are graph inputs)
        engine.abort(request_id)
    engine.step()
    other = random_model(vocab_size=6, scale=5.0, seed=3)
    engine.load_weights(other.state_dict())
    params = [dataclasses.replace(q, max_tokens=12) for q in params]
    assert engine.generate(prompts, params)[0].token_ids == naive_greedy(other, prompts[0], 12)


def full_forward_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's logits (n, V) at the positions that produced tokens, from one forward of prompt + tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0]
    return logits[len(prompt) - 1 : len(prompt) + len(tokens) - 1]


@pytest.mark.parametrize("k", [0, 2])
def test_processed_logprobs_are_the_sampling_distribution(small_vocab, k):
    """Each token's processed log-probability is log(filtered_probs) of the full forward at its position, with and
    without speculation (where the final token of a step may come from the residual, yet the target is reported)."""
    engine = Engine(small_vocab, config=EngineConfig(max_batch=3, max_len=48, speculative_tokens=k))
    prompts = [[1, 2, 3], [4, 4, 0, 1, 5, 2, 3], [5, 1]]
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_tokens=24, seed=3, logprobs=2,
                            logprobs_mode="processed")
    for prompt, done in zip(prompts, engine.generate(prompts, params)):
        logits = full_forward_logits(small_vocab, prompt, done.token_ids)
        expected = filtered_probs(logits[None], torch.tensor([0.7]), torch.tensor([5]), torch.tensor([0.9]))[0].log()
        got = torch.tensor([lp.logprob for lp in done.logprobs])
        assert torch.allclose(got, expected.gather(1, torch.tensor(done.token_ids)[:, None])[:, 0], atol=1e-5)
        assert all(lp.top[0][1] == pytest.approx(expected[i].max().item(), abs=1e-5) for i, lp in enumerate(done.logprobs))
        assert done.forced == [False] * len(done.token_ids) and done.weights_version == 0
    if k:
        assert 0 < sum(engine.stats.accepted) < sum(engine.stats.proposed)  # both branches of the verification ran


def test_processed_logprobs_without_filtering_are_the_raw_ones(small_vocab):
    engine = Engine(small_vocab, config=EngineConfig(max_batch=2, max_len=32))
    raw, processed = engine.generate([[1, 2, 3]] * 2, [
        SamplingParams(max_tokens=16, seed=5, logprobs=1, logprobs_mode=mode) for mode in ("raw", "processed")])
    assert raw.token_ids == processed.token_ids
    assert [lp.logprob for lp in raw.logprobs] == pytest.approx([lp.logprob for lp in processed.logprobs], abs=1e-6)
    greedy = SamplingParams(temperature=0, top_p=0.5, max_tokens=8, logprobs=0, logprobs_mode="processed")
    done = engine.generate([[1, 2, 3]], greedy)[0]  # greedy: the raw distribution, whatever top_p says
    expected = torch.log_softmax(full_forward_logits(small_vocab, [1, 2, 3], done.token_ids), -1)
    assert [lp.logprob for lp in done.logprobs] == pytest.approx(
        expected.gather(1, torch.tensor(done.token_ids)[:, None])[:, 0].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="logprobs_mode"):
        engine.submit([1], SamplingParams(logprobs_mode="processed_logprobs"))


@pytest.mark.parametrize("k", [0, 2])
def test_forced_think_end_is_marked(text_model, k):
    """forced is True exactly where the budget put `</think>` in place of what the model would have said, and there
    the processed log-probability is certainty."""
    model, tokenizer = text_model
    engine = Engine(model, tokenizer, EngineConfig(max_batch=2, max_len=96, speculative_tokens=k))
    messages = [{"role": "user", "content": "Where is the sun?"}]
    free = engine.chat([messages], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert tokenizer.end_think_id not in free.token_ids[:8] and free.forced == [False] * 30
    for budget, grace in [(0, 0), (4, 3)]:
        params = SamplingParams(temperature=0, max_tokens=30, max_thinking_tokens=budget, thinking_grace=grace,
                                ignore_eos=True, logprobs=0, logprobs_mode="processed")
        done = engine.chat([messages], params)[0]
        end = done.token_ids.index(tokenizer.end_think_id)
        assert done.token_ids[:end] == free.token_ids[:end] and budget <= end <= budget + grace
        assert done.forced == [i == end for i in range(30)]
        assert done.logprobs[end].logprob == 0 and all(lp.logprob < 0 for lp in done.logprobs[:end])
    sampled = SamplingParams(max_tokens=20, max_thinking_tokens=2, thinking_grace=0, seed=1, ignore_eos=True)
    done = engine.chat([messages], sampled)[0]
    assert done.forced[done.token_ids.index(tokenizer.end_think_id)] and sum(done.forced) == 1


def test_drafts_follow_the_tokens_kept_when_the_budget_forces_one(text_model):
    """Every draft is the MTP head's prediction from the tokens the sequence holds, also after a step where the
    thinking budget replaced a token (the decode step drafted from the replaced one; the engine drafts again): each
    first draft equals the teacher-forced MTP unroll of one full forward over the sequence."""
    model, tokenizer = text_model
    engine = Engine(model, tokenizer, EngineConfig(max_batch=1, max_len=96, speculative_tokens=2))
    seen = []
    set_drafts = engine._set_drafts

    def record(seqs, tokens, probs):
        set_drafts(seqs, tokens, probs)
        seen.extend((seqs[0].prompt + seqs[0].tokens, seqs[0].drafts[0]) for _ in seqs)

    engine._set_drafts = record
    params = SamplingParams(temperature=0, max_tokens=24, max_thinking_tokens=5, thinking_grace=0, ignore_eos=True)
    done = engine.chat([[{"role": "user", "content": "Where is the sun?"}]], params)[0]
    assert sum(done.forced) == 1
    latest = {len(ids): (ids, first) for ids, first in seen}  # the drafts each length was last given
    with torch.no_grad():
        for ids, first in latest.values():
            ids = torch.tensor([ids])
            mtp = model.mtp_hidden(model.model(ids), ids, 1)[0]
            assert first == model.logits(mtp[0, -2]).argmax().item()
    assert len(done.prompt_token_ids) + done.forced.index(True) + 1 in latest


def test_load_weights_in_place(small_vocab, tmp_path):
    """A state dict, then a checkpoint folder: outputs become the new model's, versions count up (or are set), the
    cache is the same; a checkpoint of another shape, or a load while requests run, is refused with the old
    weights intact."""
    engine = Engine(random_model(vocab_size=6, scale=5.0), config=EngineConfig(max_batch=2, max_len=32))
    cache = engine.cache.layers[0].ssm
    prompts, greedy = [[1, 2, 3], [5, 0]], SamplingParams(temperature=0, max_tokens=10)
    before = engine.generate(prompts, greedy)
    other, third = random_model(vocab_size=6, scale=5.0, seed=1), random_model(vocab_size=6, scale=5.0, seed=2)
    assert engine.load_weights(other.state_dict()) == 1 == engine.weights_version
    after = engine.generate(prompts, greedy)
    assert [c.token_ids for c in after] == [naive_greedy(other, p, 10) for p in prompts] != [c.token_ids for c in before]
    assert [c.weights_version for c in before + after] == [0, 0, 1, 1] and engine.cache.layers[0].ssm is cache
    n3.save_pretrained(third, tmp_path / "third")
    assert engine.load_weights(tmp_path / "third", version=7) == 7
    assert [c.token_ids for c in engine.generate(prompts, greedy)] == [naive_greedy(third, p, 10) for p in prompts]
    n3.save_pretrained(random_model(vocab_size=6, hidden_size=16), tmp_path / "narrow")
    with pytest.raises(UserError, match="hidden_size 32 -> 16"):
        engine.load_weights(tmp_path / "narrow")
    with pytest.raises(UserError, match="1 missing"):
        engine.load_weights({k: v for k, v in third.state_dict().items() if k != "lm_head.weight"})
    with pytest.raises(UserError, match="does not exist|not a directory"):
        engine.load_weights(tmp_path / "nowhere")
    running = engine.submit(prompts[0], greedy)
    engine.step()
    with pytest.raises(RuntimeError, match="running"):
        engine.load_weights(small_vocab.state_dict())
    assert engine.run([running])[0].token_ids == naive_greedy(third, prompts[0], 10) and engine.weights_version == 7


def test_background_reload_waits_for_requests_in_flight(small_vocab):
    """As SGLang's update_weights_from_disk: a request in flight ends with the old weights, one submitted after the
    reload runs with the new; a reload that does not fit fails its future and the engine serves on; with abort the
    requests in flight end at once."""
    old = random_model(vocab_size=6, scale=5.0, seed=4)
    expected = naive_greedy(old, [1, 2, 3], 30)  # now: the reload writes into old's own tensors
    background = BackgroundEngine(Engine(old, config=EngineConfig(max_batch=2, max_len=48))).start()
    results: dict[str, Completion] = {}
    finished = threading.Semaphore(0)

    def submit(prompt):
        deltas = []

        def receive(delta):
            deltas.append(delta)
            if delta.finish_reason:
                results[delta.request_id] = Completion.from_deltas(prompt, deltas, False)
                finished.release()
        return background.submit(receive, prompt, SamplingParams(temperature=0, max_tokens=30)).request_id

    first = submit([1, 2, 3])
    loaded = background.update_weights(small_vocab.state_dict())
    second = submit([1, 2, 3])
    assert loaded.result(60) == 1
    bad = background.update_weights({"lm_head.weight": torch.zeros(6, 32)})
    with pytest.raises(UserError):
        bad.result(60)
    finished.acquire(timeout=60), finished.acquire(timeout=60)
    assert results[first].token_ids == expected != naive_greedy(small_vocab, [1, 2, 3], 30)
    assert results[first].weights_version == 0
    assert results[second].token_ids == naive_greedy(small_vocab, [1, 2, 3], 30)
    assert results[second].weights_version == 1
    third = submit([1, 2, 3])
    assert background.update_weights(old.state_dict(), version=9, abort=True).result(60) == 9
    finished.acquire(timeout=60)
    assert results[third].finish_reason == "abort" and len(results[third].token_ids) < 30
    background.stop()
