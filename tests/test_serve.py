"""`n3 serve` through the official openai client: one server process for the module, answers checked against the
in-process engine on the same checkpoint; malformed requests; metrics; graceful shutdown; the CLI's errors. Weight
reloads against the app served in this process."""

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import model as n3
from model.engine import Engine, EngineConfig, SamplingParams
from n3cli.main import main
from stages.serve.app import Server, build_app
from tests.conftest import free_port
from tests.test_engine import random_model

openai = pytest.importorskip("openai")

N3 = Path(sys.executable).parent / "n3"
MESSAGES = [{"role": "user", "content": "The sky is blue. /no_think"}]
THINKING = [{"role": "user", "content": "Where is the sun?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, scale=4.0, max_position_embeddings=96), path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint, tokenizer):
    """The in-process engine on the same checkpoint and settings as the server: what every answer must equal."""
    return Engine(n3.from_pretrained(checkpoint), tokenizer, EngineConfig(max_batch=8, max_len=96, speculative_tokens=2))


@contextmanager
def serving(checkpoint: Path, *options: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`n3 serve` on a checkpoint in a subprocess, once /health says ready: (process, base URL). SIGTERM after."""
    port = free_port()
    process = subprocess.Popen([str(N3), "serve", "-c", str(checkpoint), "--port", str(port), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ | (env or {}))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health") as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
        if process.poll() is not None:
            pytest.fail(f"n3 serve exited: {process.stdout.read()}")
    else:
        process.kill()
        pytest.fail("n3 serve did not become healthy")
    yield process, url
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


@contextmanager
def serving_in_process(server: Server) -> Iterator[str]:
    """A Server's app under uvicorn on a thread of this process, once /health says ready: its base URL."""
    import uvicorn

    port = free_port()
    http = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while server.status != "ready" or get(url + "/health")[0] != 200:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail(f"the in-process server did not become healthy ({server.status}: {server.error})")
        time.sleep(0.1)
    yield url
    http.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def server(checkpoint):
    options = ["-s", "serve.max_batch=8", "-s", "serve.speculative_tokens=2",
               "-s", "serve.compile=false"]  # test_engine covers compilation
    # A tiny model: one thread, no contention with the test process.
    with serving(checkpoint, *options, env={"OMP_NUM_THREADS": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0)


def get(url: str) -> tuple[int, dict | None]:
    """(status, JSON body); status 0 while nothing listens."""
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat"] and models[0].model_extra["max_model_len"] == 96
    with urllib.request.urlopen(server[1] + "/health") as response:
        assert json.loads(response.read()) == {"status": "ready"}


def test_chat_answers_like_the_engine(client, reference, tokenizer):
    expected = reference.chat([THINKING], SamplingParams(temperature=0, max_tokens=12))[0]
    answer = client.chat.completions.create(model="tiny-chat", messages=THINKING, max_tokens=12, temperature=0)
    message = answer.choices[0].message
    assert message.content == expected.text and message.model_extra["reasoning_content"] == expected.reasoning
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == len(tokenizer.encode_chat(THINKING))
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    budget = SamplingParams(temperature=0, max_tokens=12, max_thinking_tokens=2, thinking_grace=1)
    expected = reference.chat([THINKING], budget)[0]
    answer = client.chat.completions.create(model="tiny-chat", messages=THINKING, max_tokens=12, temperature=0,
                                            extra_body={"max_thinking_tokens": 2, "thinking_grace": 1})
    assert answer.choices[0].message.model_extra["reasoning_content"] == expected.reasoning
    assert answer.choices[0].message.content == expected.text


def test_chat_template_kwargs_tools_and_histories_render_as_the_engine_renders(client, reference, tokenizer):
    """chat_template_kwargs, tools, and histories with reasoning and tool calls (arguments as OpenAI's JSON string)
    reach the checkpoint's template as the in-process engine passes them."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    history = THINKING + [
        {"role": "assistant", "content": "", "reasoning_content": "ok",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sky"},
    ]
    parsed = history[:1] + [{**history[1], "tool_calls": [{"id": "c1", "type": "function",
                                                           "function": {"name": "f", "arguments": {"q": 1}}}]},
                            history[2]]
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = reference.chat([THINKING], params, enable_thinking=False)[0]
    answer = client.chat.completions.create(model="tiny-chat", messages=THINKING, max_tokens=8, temperature=0,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(tokenizer.encode_chat(THINKING, enable_thinking=False))
    assert expected.reasoning is None and "reasoning_content" not in answer.choices[0].message.model_extra
    # Longer than this model's context: the error counts the tokens the conversation rendered to.
    rendered = len(tokenizer.encode_chat(parsed, tools=tools))
    with pytest.raises(openai.BadRequestError, match=f"the prompt has {rendered} "):
        client.chat.completions.create(model="tiny-chat", messages=history, tools=tools, max_tokens=8)


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny-chat", messages=THINKING, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert (content, reasoning) == (whole.choices[0].message.content, whole.choices[0].message.model_extra["reasoning_content"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    two = list(client.chat.completions.create(**kwargs, n=2, stream=True))
    for index in (0, 1):
        content = "".join(c.choices[0].delta.content or "" for c in two if c.choices[0].index == index)
        assert content == whole.choices[0].message.content
    prompt = dict(model="tiny-chat", prompt=["The grass is", "The sky"], max_tokens=10, temperature=0)
    texts = [c.text for c in client.completions.create(**prompt).choices]
    assert len(texts) == 2 and texts[1] == client.completions.create(**prompt | {"prompt": "The sky"}).choices[0].text
    streamed = ["", ""]
    for chunk in client.completions.create(**prompt, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == texts


def test_n_choices_and_stop_sequences(client, reference):
    """n = 3 with a seed: choice i is the engine's sample with seed + i."""
    sampled = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, n=3, seed=7)
    expected = reference.chat([MESSAGES] * 3, [SamplingParams(max_tokens=8, seed=7 + i) for i in range(3)])
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.message.content for c in sampled.choices] == [e.text for e in expected]
    assert sampled.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    full = client.completions.create(model="tiny-chat", prompt="The sun is", max_tokens=20, temperature=0)
    stop = full.choices[0].text[4:7]
    cut = client.completions.create(model="tiny-chat", prompt="The sun is", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_echo_logprobs_score_the_prompt(client, reference, tokenizer):
    """lm-eval's local-completions: token-id prompt, echo, logprobs, one generated token."""
    context, continuation = tokenizer.encode("The grass is"), tokenizer.encode(" green.")
    (expected, is_greedy), = reference.loglikelihood([(context, continuation)])
    out = client.completions.create(model="tiny-chat", prompt=context + continuation, max_tokens=1, echo=True,
                                    logprobs=1, temperature=0)
    logprobs = out.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.tokens) == len(context + continuation) + 1
    scored = logprobs.token_logprobs[len(context) : -1]
    assert sum(scored) == pytest.approx(expected, abs=1e-3)
    greedy = all(lp == max(top.values()) for lp, top in zip(scored, logprobs.top_logprobs[len(context) : -1]))
    assert greedy == is_greedy
    chat = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries)  # greedy picks the top
    processed = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4, logprobs=True,
                                               top_logprobs=3, seed=1,
                                               extra_body={"top_k": 2, "logprobs_mode": "processed"})
    for e in processed.choices[0].logprobs.content:  # top-k 2: two tokens share all the mass, the rest is -inf
        assert sum(math.exp(t.logprob) for t in e.top_logprobs[:2]) == pytest.approx(1, abs=1e-5)
        assert e.top_logprobs[2].logprob == -9999.0 and e.logprob > -9999.0


def test_32_concurrent_requests(server, reference):
    prompts = [f"The sky is blue {i}." for i in range(32)]
    expected = [c.text for c in reference.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]

    async def ask_all():
        client = openai.AsyncOpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0)
        answers = await asyncio.gather(*(
            client.completions.create(model="tiny-chat", prompt=p, max_tokens=12, temperature=0) for p in prompts
        ))
        await client.close()
        return [a.choices[0].text for a in answers]

    assert asyncio.run(ask_all()) == expected


def test_malformed_requests_are_rejected_and_the_server_keeps_serving(client, server):
    url = server[1]
    valid = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2}
    cases = [
        (b"{not json", 400, None),
        ({"model": "tiny-chat"}, 400, "missing_required_parameter"),
        (valid | {"temperature": "hot"}, 400, "invalid_value"),
        (valid | {"temperature": 3}, 400, "invalid_value"),
        (valid | {"n": 0}, 400, "invalid_value"),
        (valid | {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value"),
        (valid | {"model": "gpt-4"}, 404, "model_not_found"),
        (valid | {"messages": [{"role": "user", "content": "word " * 200}]}, 400, "context_length_exceeded"),
        (valid | {"max_tokens": 1000}, 400, "context_length_exceeded"),
        (valid | {"max_thinking_tokens": -1}, 400, "invalid_value"),
        (valid | {"chat_template_kwargs": "off"}, 400, "invalid_value"),
        (valid | {"tools": ["lookup"]}, 400, "invalid_value"),
        (valid | {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f",
                                                                      "arguments": "{not json"}}]}]}, 400, "invalid_value"),
    ]
    for body, status, code in cases:
        got, error = post(url + "/v1/chat/completions", body)
        assert got == status, (body, error)
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["code"] == code
    assert post(url + "/v1/completions", {"model": "tiny-chat", "prompt": []})[0] == 400
    assert post(url + "/v1/nothing", {})[0] == 404
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=[], max_tokens=2)
    assert client.chat.completions.create(**valid, seed=-(2**70)).choices[0].finish_reason in ("stop", "length")


def test_metrics(client, server):
    client.completions.create(model="tiny-chat", prompt="The sky", max_tokens=3)
    with urllib.request.urlopen(server[1] + "/metrics") as response:
        text = response.read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['n3_http_responses_total{path="/v1/completions",code="200"}'] >= 1
    assert values["n3_prompt_tokens_total"] > 0 and values["n3_generation_tokens_total"] > 0
    assert values["n3_spec_acceptance_length_mean"] >= 1 and 'n3_spec_draft_acceptance_rate{depth="2"}' in values
    assert values["n3_cache_rows_total"] == 8 and "n3_decode_batch_size_mean" in values
    assert values["n3_weights_version"] == 0


def test_graceful_shutdown_finishes_requests_in_flight(server):
    """SIGTERM during a stream: the stream still ends with every token and [DONE]; then the process ends (uvicorn
    re-raises the signal once it has shut down, so process managers see it) without a traceback."""
    process, url = server
    body = {"model": "tiny-chat", "prompt": "The sky", "max_tokens": 60, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        lines = [response.readline()]
        process.send_signal(signal.SIGTERM)
        lines += response.read().decode().splitlines()
    events = [line for line in lines if line and line.strip()]
    assert events[-1].strip() == "data: [DONE]"
    finish = [json.loads(e[len("data: "):])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finish[-1] == "length"
    assert process.wait(30) in (0, -signal.SIGTERM)
    log = process.stdout.read()
    assert "Finished server process" in log and "Traceback" not in log


def test_health_is_503_while_loading():
    """In-process, through the ASGI interface: a model that has not loaded yet answers 503, then 200."""
    release = __import__("threading").Event()

    def load():
        release.wait(30)
        return Engine(random_model(), config=EngineConfig(max_batch=1, max_len=16))

    server = Server("m", load)
    app = build_app(server)
    assert asgi(app, "GET", "/health") == (503, {"status": "loading"})
    status, body = asgi(app, "POST", "/v1/completions", {"model": "m", "prompt": [1], "max_tokens": 1})
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    release.set()
    server.load()
    assert asgi(app, "GET", "/health") == (200, {"status": "ready"})
    server.engine.stop()


def asgi(app, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One request through an ASGI app, without a network."""
    sent = []
    data = json.dumps(body).encode() if body is not None else b""

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("test", 80), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def n3_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`n3 ARGS` in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_cli_errors_and_dry_run(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("N3_DEBUG", raising=False)
    status, _, err = n3_cli(capsys, "serve")
    assert status == 2 and "n3 pretrain" in err and err.count("\n") == 1
    status, _, err = n3_cli(capsys, "serve", "-c", "nowhere")
    assert status == 2 and err.startswith("error: nowhere does not exist")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert n3_cli(capsys, "serve", "-c", "broken")[0] == 2
    status, _, err = n3_cli(capsys, "serve", "-c", str(checkpoint), "-s", "serve.max_batch=0")
    assert status == 2 and "max_batch" in err
    run = Path("runs/plain/checkpoints/step-00000010")
    n3.save_pretrained(random_model(pattern="M*E", vocab_size=512), run)
    status, _, err = n3_cli(capsys, "serve")  # finds the newest run, whose checkpoint lacks a tokenizer
    assert status == 2 and f"{run} has no tokenizer.json" in err
    status, out, _ = n3_cli(capsys, "serve", "-c", str(checkpoint), "--dry-run")
    assert status == 0 and "tiny-chat" in out and "caches (preallocated)" in out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, _, err = n3_cli(capsys, "serve", "-c", str(checkpoint), "--port", str(taken.getsockname()[1]))
    assert status == 2 and "cannot listen" in err


def test_a_failed_compilation_falls_back_to_eager(checkpoint, monkeypatch):
    import presets
    from stages.runtime.settings import load_engine
    from stages.serve import plan_serve

    def broken(self):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(Engine, "warm_up", broken)
    plan = plan_serve(checkpoint, presets.load("cpu", ["serve.max_batch=2"]))
    assert plan.engine.compile
    warnings = []
    engine = load_engine(plan.checkpoint, plan.config, plan.engine, warnings.append)
    assert not engine.config.compile and engine.generate([[1, 2]], SamplingParams(max_tokens=2))[0].token_ids
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "decoding eagerly" in warnings[0]


def test_serves_a_quantized_checkpoint(tmp_path, tokenizer):
    """A modelopt-format checkpoint from `n3 quantize` (the Nemotron recipe: NVFP4 experts, FP8 Mamba projections)
    loads and answers like the dequantized model it holds."""
    pytest.importorskip("modelopt.torch.quantization")
    import presets
    from stages.quantize import quantize
    from stages.serve import plan_serve
    from tests.test_model import tiny_config

    source = tmp_path / "bf16"
    torch.manual_seed(0)
    n3.save_pretrained(n3.build(tiny_config(vocab_size=512, moe_intermediate_size=16, intermediate_size=32,
                                            moe_shared_expert_intermediate_size=32)), source)
    tokenizer.save(source)
    quantize(source, tmp_path / "q", recipe="nemotron", four_over_six=None, calib_tokens=256, eval_tokens=256, seq_len=64)
    plan = plan_serve(tmp_path / "q", presets.load("cpu", ["serve.compile=false", "serve.max_batch=2"]))
    engine = plan.load()
    greedy = SamplingParams(temperature=0, max_tokens=6)
    expected = Engine(n3.from_pretrained(tmp_path / "q"), tokenizer).generate(["The sky"], greedy)[0].token_ids
    assert engine.generate(["The sky"], greedy)[0].token_ids == expected and len(expected) == 6


def test_weights_reload_round_trip(checkpoint, tmp_path, tokenizer):
    """POST /update_weights_from_disk on an in-process n3 serve: answers become the new checkpoint's and carry its
    version, /get_model_info follows; a bad path, a checkpoint of another shape or a bad field is a 400 with
    SGLang's body, and the loaded weights serve on."""
    other, narrow = tmp_path / "other", tmp_path / "narrow"
    n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, scale=4.0, seed=1, max_position_embeddings=96),
                       other)
    n3.save_pretrained(random_model(vocab_size=tokenizer.vocab_size, hidden_size=16), narrow)
    config = EngineConfig(max_batch=2, max_len=96)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    expected = {path: Engine(n3.from_pretrained(path), tokenizer, config).chat([THINKING], greedy)[0]
                for path in (checkpoint, other)}
    assert expected[checkpoint].token_ids != expected[other].token_ids
    server = Server("tiny-chat", lambda: Engine(n3.from_pretrained(checkpoint), tokenizer, config), checkpoint)
    chat = {"model": "tiny-chat", "messages": THINKING, "max_tokens": 12, "temperature": 0, "return_token_ids": True}

    def answer(path: Path, version: int) -> None:
        status, body = post(url + "/v1/chat/completions", chat)
        assert status == 200 and body["prompt_token_ids"] == expected[path].prompt_token_ids
        choice = body["choices"][0]
        assert choice["token_ids"] == expected[path].token_ids and choice["weights_version"] == version
        assert choice["forced"] == [False] * len(choice["token_ids"])
        assert get(url + "/get_model_info") == (200, {"model_path": str(path), "is_generation": True,
                                                      "weights_version": version})

    with serving_in_process(server) as url:
        answer(checkpoint, 0)
        status, body = post(url + "/update_weights_from_disk", {"model_path": str(other), "load_format": None})
        assert (status, body["success"], body["num_paused_requests"], body["weights_version"]) == (200, True, 0, 1)
        answer(other, 1)
        for bad, says in [({"model_path": str(tmp_path / "nowhere")}, "not a directory"),
                          ({"model_path": str(narrow)}, "hidden_size 32 -> 16"),
                          ({"model_path": str(other), "load_format": "gguf"}, "load_format"),
                          ({"model_path": str(other), "weight_version": "v2"}, "weight_version"),
                          ({}, "model_path")]:
            status, body = post(url + "/update_weights_from_disk", bad)
            assert status == 400 and body["success"] is False and says in body["message"], body
        answer(other, 1)
        status, body = post(url + "/update_weights_from_disk", {"model_path": str(checkpoint), "weight_version": 5})
        assert status == 200 and body["weights_version"] == 5
        answer(checkpoint, 5)
        ids = {"model": "tiny-chat", "prompt": [3, 4, 5], "max_tokens": 4, "temperature": 0, "return_token_ids": True}
        choice = post(url + "/v1/completions", ids)[1]["choices"][0]
        assert choice["prompt_token_ids"] == [3, 4, 5] and len(choice["token_ids"]) == 4
        assert choice["weights_version"] == 5
        assert post(url + "/v1/completions", ids | {"stream": True})[0] == 400
