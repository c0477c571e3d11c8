"""Rollouts for RL through both backends: the in-process engine and n3 serve over HTTP (its app served in this
process) draw the same samples for a seed, with the sampling distribution's log-probabilities, the tokens the engine
forced and the weights version; update_weights reloads both."""

import pytest

import model as n3
from model.engine import Engine, EngineConfig
from model.errors import UserError
from stages.rollout.backend import EngineBackend
from stages.rollout.client import EndpointBackend
from stages.serve.app import Server
from tests.test_engine import random_model
from tests.test_serve import MESSAGES, THINKING, serving_in_process

CONFIG = EngineConfig(max_batch=4, max_len=96, speculative_tokens=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("rollout")
    for seed in (0, 1):
        n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, scale=4.0, seed=seed,
                                        max_position_embeddings=96), root / f"step-{seed}")
        tokenizer.save(root / f"step-{seed}")
    return root / "step-0", root / "step-1"


@pytest.fixture(scope="module")
def backends(checkpoints, tokenizer):
    """(EngineBackend, EndpointBackend) on the same checkpoint and engine settings."""
    first, _ = checkpoints

    def engine() -> Engine:
        return Engine(n3.from_pretrained(first), tokenizer, CONFIG)

    with serving_in_process(Server("tiny-chat", engine, first)) as url:
        yield EngineBackend(engine(), "in-process"), EndpointBackend(url + "/v1", first, concurrency=2)


def assert_same(local: list[list], remote: list[list]) -> None:
    assert [len(samples) for samples in local] == [len(samples) for samples in remote]
    for a, b in zip(sum(local, []), sum(remote, [])):
        assert (a.prompt_ids, a.token_ids, a.forced) == (b.prompt_ids, b.token_ids, b.forced)
        assert (a.content, a.reasoning, a.finish_reason, a.weights_version) == (
            b.content, b.reasoning, b.finish_reason, b.weights_version)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_rollouts_agree_across_backends(backends, tokenizer):
    """Three samples of a thinking and a non-thinking conversation, top-k / top-p sampling with MTP speculation, the
    thought cut by a budget of 0: the first token of each thinking sample is the forced `</think>` (certain under
    the sampling distribution); samples differ, and a second call gives the same ones."""
    local_backend, endpoint = backends
    kwargs = dict(max_tokens=16, n=3, temperature=1.0, top_p=0.9, top_k=20, max_thinking_tokens=0, seed=11)
    local = local_backend.rollout([THINKING, MESSAGES], **kwargs)
    assert_same(local, endpoint.rollout([THINKING, MESSAGES], **kwargs))
    thinking, plain = local
    assert all(r.forced == [True] + [False] * (len(r.token_ids) - 1) for r in thinking)
    assert all(r.token_ids[0] == tokenizer.end_think_id and r.logprobs[0] == 0 and r.reasoning == "" for r in thinking)
    assert all(not any(r.forced) and r.reasoning is None for r in plain)
    for r in thinking + plain:
        assert len(r.logprobs) == len(r.token_ids) and all(lp < 0 for lp, f in zip(r.logprobs, r.forced) if not f)
        assert r.prompt_ids == tokenizer.encode_chat(THINKING if r in thinking else MESSAGES)
        assert r.finish_reason in ("stop", "length") and r.weights_version == 0
    assert len({tuple(r.token_ids) for r in plain}) == 3
    again = local_backend.rollout([THINKING, MESSAGES], **kwargs)[1]  # the seeds of conversation 1
    assert [r.token_ids for r in again] == [r.token_ids for r in plain]
    assert endpoint.chat([THINKING], 12) == local_backend.chat([THINKING], 12)  # the request chat() shares


def test_update_weights_on_both_backends(backends, checkpoints, tmp_path, tokenizer):
    local_backend, endpoint = backends
    first, second = checkpoints
    kwargs = dict(max_tokens=12, n=2, temperature=0.7, seed=3)
    before = local_backend.rollout([MESSAGES], **kwargs)
    assert local_backend.update_weights(second) == endpoint.update_weights(second) == 1
    after = local_backend.rollout([MESSAGES], **kwargs)
    assert_same(after, endpoint.rollout([MESSAGES], **kwargs))
    assert all(r.weights_version == 1 for r in after[0])
    assert [r.token_ids for r in after[0]] != [r.token_ids for r in before[0]]
    n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size + 1), tmp_path / "wider")
    for backend in backends:
        with pytest.raises(UserError, match="vocab_size"):
            backend.update_weights(tmp_path / "wider")
    assert_same(after, endpoint.rollout([MESSAGES], **kwargs))  # the loaded weights still serve
    assert local_backend.update_weights(first) == endpoint.update_weights(first) == 2


def test_a_rollout_engine_holds_the_longest_prompt_and_its_reply(tokenizer):
    from stages.rollout.backend import rollout_context

    short, long = [{"role": "user", "content": "Hi."}], [{"role": "user", "content": "A longer question. " * 6}]
    longest = len(tokenizer.encode_chat(long, enable_thinking=True))
    context = rollout_context([short, long], tokenizer, 40, 4096, enable_thinking=True)
    assert context % 64 == 0 and longest + 40 + 2 <= context < longest + 40 + 2 + 64
    assert rollout_context([short, long], tokenizer, 40, 64, enable_thinking=True) == 64  # never past the rows
