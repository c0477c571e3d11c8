"""`n3 eval` against an OpenAI-compatible endpoint: `n3 serve` in a subprocess on a tiny checkpoint. Every evaluation
must give what the in-process engine gives on the same checkpoint (RULER answers, perplexity, lm-eval scores), and
the endpoint's failures must be one-line errors."""

import json
import math

import pytest

from model.errors import UserError
from n3cli.main import main
from presets import load
from stages.eval.perplexity import Tokens, perplexity
from stages.eval.ruler import RulerOptions, run_ruler
from stages.eval.throughput import Shape, measure
from stages.rollout.backend import engine_backend
from stages.rollout.client import EndpointBackend
from tests.test_eval import save_talkative
from tests.test_serve import serving


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return save_talkative(tmp_path_factory.mktemp("endpoint") / "tiny-eval", tokenizer, 1100)


@pytest.fixture(scope="module")
def url(checkpoint):
    with serving(checkpoint) as (_, base):  # the cpu preset: a compiled decode step
        yield base


@pytest.fixture(scope="module")
def both(url, checkpoint):
    """The endpoint and the in-process engine on the same checkpoint."""
    in_process = engine_backend(checkpoint, load("cpu", ["serve.compile=false"]), print)
    return EndpointBackend(url + "/v1", checkpoint, concurrency=4), in_process


def test_ruler_through_the_endpoint_answers_like_the_engine(both, url):
    endpoint, engine = both
    assert endpoint.model == "tiny-eval" and endpoint.context == 1100 and endpoint.base == url
    options = RulerOptions([1024], 2, ["niah_single_2", "vt"])
    remote, local = run_ruler(endpoint, options), run_ruler(engine, options)
    assert [p["prediction"] for p in remote.predictions] == [p["prediction"] for p in local.predictions]
    assert all(len(p["prediction"]) > 20 for p in local.predictions)
    assert [p["prompt_tokens"] for p in remote.predictions] == [p["prompt_tokens"] for p in local.predictions]
    assert remote.scores == local.scores and "tiny-eval" in remote.backend


def test_perplexity_and_scores_through_the_endpoint(both, tokenizer):
    endpoint, engine = both
    ids = [tokenizer.bos_id] + tokenizer.encode("The grass is green. The sky is blue. Here we go. " * 6)
    remote = perplexity(endpoint, Tokens(ids, "text"), window=40, stride=16)
    local = perplexity(engine, Tokens(ids, "text"), window=40, stride=16)
    assert remote.windows == local.windows > 3 and math.isclose(remote.nll, local.nll, rel_tol=1e-5)
    remote_scores, local_scores = endpoint.score([ids[:30]])[0], engine.score([ids[:30]])[0]
    assert [s.greedy for s in remote_scores] == [s.greedy for s in local_scores]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(remote_scores, local_scores))


def test_throughput_through_the_endpoint(both):
    endpoint, _ = both
    result = measure(endpoint, Shape(50, 5), concurrency=2, requests=3)
    assert (result.input_tokens, result.output_tokens, result.requests) == (150, 15, 3)
    assert len(result.ttft) == 3 and min(result.ttft) > 0 and result.summary()["output_tokens_per_s"] > 0


def test_lm_eval_loglikelihood_through_the_endpoint(both):
    pytest.importorskip("lm_eval")
    from stages.eval.lm_eval_model import N3LM

    endpoint, engine = both
    requests = [type("Request", (), {"args": args})() for args in
                [("The sky is", " blue"), ("Here we", " go"), ("", "The sun is yellow.")]]
    remote, local = N3LM(endpoint, 256).loglikelihood(requests), N3LM(engine, 256).loglikelihood(requests)
    assert [g for _, g in remote] == [g for _, g in local]
    assert all(math.isclose(a, b, abs_tol=1e-4) for (a, _), (b, _) in zip(remote, local))
    generations = [type("Request", (), {"args": ("The grass is", {"until": ["."], "max_gen_toks": 8})})()]
    assert N3LM(endpoint, 256).generate_until(generations) == N3LM(engine, 256).generate_until(generations)


def test_endpoint_errors_are_user_errors(url, checkpoint, tmp_path, capsys):
    with pytest.raises(UserError, match="does not serve 'other'; it serves tiny-eval"):
        EndpointBackend(url, checkpoint, model="other")
    endpoint = EndpointBackend(url, checkpoint)
    with pytest.raises(UserError, match=r"HTTP 400: this model's context is 1100 tokens"):
        endpoint.generate([[1] * 1200], 4)
    (tmp_path / "text.txt").write_text("The grass is green. " * 30)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "perplexity", "--endpoint", url, "--tokenizer", str(checkpoint), "--text",
              str(tmp_path / "text.txt"), "--window", "64", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out/perplexity.json").read_text())
    assert summary["backend"].startswith(url) and summary["window"] == 64


def test_tasks_through_the_endpoint_answer_like_the_engine(both):
    """The built-in tasks through /v1/chat/completions (the server's chat template, chat_template_kwargs for the
    reasoning mode) give the replies, scores and reply lengths of the in-process engine."""
    from stages.envs.suite import evaluate_suite, parse_suite, suite_problems

    endpoint, engine = both
    problems = suite_problems(parse_suite(["math:1", "instructions:1"]), "test", 2, seed=0)
    remote, local = (evaluate_suite(backend, problems, max_tokens=12) for backend in (endpoint, engine))
    fields = ("domain", "reasoning_mode", "reasoning", "answer", "tokens", "reward")
    assert [[p[f] for f in fields] for p in remote.predictions] == [[p[f] for f in fields] for p in local.predictions]
    assert {p["reasoning_mode"] for p in local.predictions} == {"on", "off"}
    assert all(p["reasoning"] is None for p in local.predictions if p["reasoning_mode"] == "off")
