"""`n3 eval` in-process: perplexity agrees with transformers' loss on the same HF checkpoint (whole and in windows) and
reads `n3 data`'s validation split; throughput counts what it ran; MTP acceptance per depth; lm-eval on local jsonl
tasks whose answers are known from the engine; the CLI writes its tables, JSON and plot, and fails cleanly."""

import json
import math

import numpy as np
import pytest
import torch

import model as n3
from model.engine import Engine, EngineConfig
from model.errors import UserError
from model.tokenizer import SPECIAL_TOKENS
from presets import load
from stages.eval.mtp import AcceptanceResult, acceptance, text_prompts
from stages.eval.perplexity import Tokens, perplexity, rolling_windows, text_tokens, validation_tokens
from stages.eval.throughput import Shape, measure, report_shapes
from stages.rollout.backend import EngineBackend, engine_backend
from tests.oracles import random_hf_model
from tests.test_engine import random_model
from tests.test_serve import n3_cli

CPU = load("cpu", ["serve.compile=false"])  # compiling the decode step is tested with n3 serve
TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
        "One of the special magic numbers for apple is: 1234567. def main(): return 42\n") * 3


def save_talkative(path, tokenizer, context: int):
    """A random tiny model that never predicts a special token, so its answers are text rather than an eos at once."""
    model = random_model(vocab_size=tokenizer.vocab_size, scale=4.0, max_position_embeddings=context)
    with torch.no_grad():
        model.lm_head.weight[[tokenizer.token_id(t) for t in SPECIAL_TOKENS]] = 0  # logit 0, below the best of 500
    n3.save_pretrained(model, path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return save_talkative(tmp_path_factory.mktemp("eval") / "tiny", tokenizer, 2048)


@pytest.fixture(scope="module")
def in_process(checkpoint):
    return engine_backend(checkpoint, CPU, print, max_len=1100)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, tokenizer):
    """A transformers NemotronH (random weights) saved by transformers, with the test tokenizer."""
    hf = random_hf_model("M*E-M*", vocab_size=tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("hf") / "hf"
    hf.save_pretrained(path)
    tokenizer.save(path)
    return hf, path


def test_rolling_windows_score_every_token_once():
    for n, window, stride in [(1, 4, None), (2, 4, None), (10, 4, None), (10, 4, 1), (37, 8, 3), (5, 16, 7)]:
        windows = rolling_windows(n, window, stride)
        scored = [p for start, end, k in windows for p in range(end - k, end)]
        assert scored == list(range(1, n)), (n, window, stride)
        assert all(0 <= start < end <= start + window for start, end, _ in windows)
        # Every scored token after the first window has at least window - stride tokens of context.
        assert all(end - k - start >= window - (stride or window - 1) for start, end, k in windows[1:])
    with pytest.raises(UserError):
        rolling_windows(10, 4, 4)


def test_perplexity_agrees_with_transformers(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint
    (tmp_path / "text.txt").write_text(TEXT)
    backend = engine_backend(path, CPU, print, max_len=512)
    tokens = text_tokens(backend, tmp_path / "text.txt")
    ids = torch.tensor([tokens.ids])
    assert tokens.ids[0] == backend.tokenizer.bos_id and len(tokens.ids) < 512
    with torch.no_grad():
        expected = hf(input_ids=ids, labels=ids).loss.item()
        logprobs = hf(input_ids=ids).logits.float().log_softmax(-1)
    whole = perplexity(backend, tokens)
    assert whole.windows == 1 and whole.scored == len(tokens.ids) - 1
    assert math.isclose(whole.nll, expected, rel_tol=1e-4) and math.isclose(whole.perplexity, math.exp(expected), rel_tol=1e-4)
    assert math.isclose(whole.bits_per_byte, whole.nll * whole.scored / math.log(2) / len(TEXT.encode()))

    # In windows of 48 tokens scoring 20 each: every window is a fresh forward of its own tokens.
    windowed = perplexity(backend, tokens, window=48, stride=20)
    total = 0.0
    for start, end, k in rolling_windows(len(tokens.ids), 48, 20):
        piece = torch.tensor([tokens.ids[start:end]])
        with torch.no_grad():
            lp = hf(input_ids=piece).logits.float().log_softmax(-1)[0]
        total += sum(lp[i - 1, tokens.ids[start + i]].item() for i in range(end - start - k, end - start))
    assert windowed.windows > 3 and math.isclose(windowed.nll, -total / windowed.scored, rel_tol=1e-4)
    assert windowed.nll > whole.nll - 0.5  # less context, never wildly better
    full = -sum(logprobs[0, i - 1, t].item() for i, t in enumerate(tokens.ids) if i) / whole.scored
    assert math.isclose(full, expected, rel_tol=1e-5)


def test_perplexity_reads_the_validation_split(tmp_path, tokenizer, in_process):
    """A corpus `n3 data` prepared with the model's tokenizer: every source's validation documents, in order."""
    from stages.data.prepare import CorpusOptions, prepare
    from stages.runtime.sources import parse_sources
    from stages.runtime.corpus import read_tokens

    for name, texts in {"prose": ["The sky is blue.", "Here we go.", "The grass is green."],
                        "code": ["def main(): return 42", "x = 1", "print(x)"]}.items():
        (tmp_path / name).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / name / f"{i}.txt").write_text(text)
    tokenizer.save(tmp_path / "tok")
    corpus = tmp_path / "corpus"
    options = CorpusOptions(vocab_size=0, tokenizer=tmp_path / "tok", val_fraction=0.5)
    manifest = prepare(parse_sources([str(tmp_path / "prose"), str(tmp_path / "code")]), corpus, options).manifest
    expected = [int(t) for source in manifest.sources for t in read_tokens(corpus, manifest, source.name, "val")]
    tokens = validation_tokens(corpus, tokenizer)
    documents = sum(source.splits["val"].documents for source in manifest.sources)
    assert tokens.window(0, len(tokens.ids)) == expected and expected.count(tokenizer.bos_id) == documents >= 2
    result = perplexity(in_process, tokens)
    direct = perplexity(in_process, Tokens(expected, "same ids"))
    assert result.nll == direct.nll and result.text_bytes is None and "validation split" in result.source

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from model.tokenizer import Tokenizer

    other = HFTokenizer(models.WordLevel({"<s>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    Tokenizer(other).save(corpus)
    with pytest.raises(UserError, match="another tokenizer"):
        validation_tokens(corpus, tokenizer)
    with pytest.raises(UserError, match="not a prepared corpus"):
        validation_tokens(tmp_path, tokenizer)


def test_throughput_counts_what_it_ran(checkpoint, tokenizer):
    assert [(s.input_len, s.output_len) for s in report_shapes(64)] == [(128, 1024), (800, 32)]
    backend = engine_backend(checkpoint, CPU, print, max_len=64, max_batch=2)
    result = measure(backend, Shape(40, 6), concurrency=2, requests=3)
    assert (result.input_tokens, result.output_tokens) == (120, 18)
    assert len(result.ttft) == 3 and all(t > 0 for t in result.ttft) and len(result.tpot) == 3
    assert len(result.itl) == 3 * 5  # one engine step per token without speculation
    summary = result.summary()
    assert summary["requests"] == 3 and summary["output_tokens_per_s"] == 18 / result.duration
    assert summary["ttft"]["p50_ms"] > 0 and summary["itl"]["p99_ms"] >= summary["itl"]["p50_ms"]
    with pytest.raises(UserError, match="exceeds the engine's batch"):
        measure(backend, Shape(40, 6), concurrency=3, requests=3)
    with pytest.raises(UserError, match="needs 80 tokens of context"):
        measure(backend, Shape(40, 40), concurrency=1, requests=1)


def test_mtp_acceptance_per_depth():
    """A 6-token vocabulary: the MTP head's drafts are often right, so acceptance is neither 0 nor 1."""
    model = random_model(vocab_size=6, scale=5.0)
    engine = Engine(model, None, EngineConfig(max_batch=4, max_len=64, speculative_tokens=3))
    ids = [int(t) for t in torch.randint(0, 6, (200,), generator=torch.Generator().manual_seed(0))]
    prompts = text_prompts(ids, [], 3, 8)
    assert [len(p) for p in prompts] == [8] * 3 and prompts[1] == ids[96:104]
    result = acceptance(EngineBackend(engine, "tiny"), prompts, 16, "random ids", timed_prompts=2)
    assert [r.depth for r in result.runs] == [1, 2, 3]
    for run in result.runs:
        assert run.generated == 2 * 16 and run.seconds > 0 and run.plain_seconds > 0  # timed: 2 prompts
        assert len(run.rates) == run.depth
        assert math.isclose(run.length, 1 + sum(run.rates))  # every verification checks every draft position
        assert all(a >= b for a, b in zip(run.rates, run.rates[1:]))  # draft j needs drafts 1..j-1
        assert run.verifications < 3 * 15  # counted on all 3 prompts: speculation saved steps
        assert run.speedup == run.plain_seconds / run.seconds
    assert result.best in result.runs and result.best.speedup == max(r.speedup for r in result.runs)
    assert result.plain_tokens_per_s > 0
    assert 0 < result.runs[0].rates[0] < 1
    assert result.conditional[0] == result.rates[0]
    assert math.isclose(result.conditional[1], result.rates[1] / result.rates[0])
    summary = result.summary()
    assert [d["acceptance_length"] for d in summary["per_depth"]] == [r.length for r in result.runs]
    assert AcceptanceResult.from_summary(summary) == result
    with pytest.raises(UserError, match="at least 1"):
        acceptance(EngineBackend(Engine(model, None, EngineConfig(max_batch=4, max_len=64)), "no drafts"), prompts,
                   8, "x")


def test_lm_eval_on_local_tasks(tmp_path, in_process, monkeypatch):
    pytest.importorskip("lm_eval")
    from stages.eval.lm_eval_model import N3LM, run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = in_process.tokenizer
    questions = [("The sky is", [" blue", " green", " yellow"]), ("Here we", [" go", " back"]),
                 ("def main():", [" return 42", " pass"])]
    # The engine's own preferences decide the labels: lm-eval must score 1 on "best" and 0 on "worst".
    best, worst = [], []
    for question, choices in questions:
        pairs = [(tok.encode(question), tok.encode(question + c)[len(tok.encode(question)):]) for c in choices]
        scores = [s for s, _ in in_process.engine.loglikelihood(pairs)]
        best.append({"question": question, "choices": choices, "label": int(np.argmax(scores))})
        worst.append({"question": question, "choices": choices, "label": int(np.argmin(scores))})
    greedy = in_process.generate([tok.encode(q) for q, _ in questions], 6, stop=["\n"])
    answers = [{"question": q, "answer": a} for (q, _), a in zip(questions, greedy)]
    for name, rows in [("best", best), ("worst", worst), ("gen", answers)]:
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        kind = ("output_type: generate_until\ndoc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                "  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n" if name == "gen" else
                "output_type: multiple_choice\ntarget_delimiter: ''\ndoc_to_target: '{{label}}'\ndoc_to_choice: '{{choices}}'\n"
                "metric_list:\n  - metric: acc\n")
        (tmp_path / f"{name}.yaml").write_text(
            f"task: n3_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / name}.jsonl\n"
            f"test_split: test\ndoc_to_text: '{{{{question}}}}'\n{kind}")
    results = run_lm_eval(in_process, ["n3_best", "n3_worst", "n3_gen"], include_path=tmp_path,
                          builtin_tasks=False)["results"]
    assert results["n3_best"]["acc,none"] == 1.0 and results["n3_worst"]["acc,none"] == 0.0
    assert results["n3_gen"]["exact_match,none"] == 1.0

    lm = N3LM(in_process, max_length=8)
    text = TEXT
    ids = [tok.bos_id] + tok.encode(text)
    assert len(ids) > 3 * 8
    whole = sum(s.logprob for s in in_process.score([ids])[0])
    rolled = sum(s.logprob for start, end, k in rolling_windows(len(ids), 8)
                 for s in in_process.score([ids[start:end]])[0][-k:])
    [value] = lm.loglikelihood_rolling([type("Request", (), {"args": (text,)})()])
    assert math.isclose(value, rolled, rel_tol=1e-6) and not math.isclose(value, whole, rel_tol=1e-3)
    with pytest.raises(UserError, match="knows no task"):
        run_lm_eval(in_process, ["n3_nope"], include_path=tmp_path, builtin_tasks=False)


def test_cli_writes_tables_json_and_plot(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "ruler"
    status, stdout, err = n3_cli(capsys, "eval", "ruler", "-c", str(checkpoint), "--lengths", "1k", "--samples", "1",
                                  "--tasks", "niah_single_1,vt,qa_1", "--set", "serve.compile=false",
                                  "--out", str(out))
    assert status == 0, err
    assert "niah_single_1" in stdout and "mean (2 tasks)" in stdout and "skipped qa_1: no SQuAD file" in stdout
    summary = json.loads((out / "ruler.json").read_text())
    assert summary["skipped"] == {"qa_1": "no SQuAD file (--squad FILE)"} and list(summary["mean"]) == ["1024"]
    assert (out / "ruler.png").read_bytes().startswith(b"\x89PNG")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["niah_single_1", "vt"] and rows[0]["prompt_tokens"] + 128 <= 1024
    assert all(r["prediction"] for r in rows)

    (tmp_path / "text.txt").write_text(TEXT)
    warmed = []
    with monkeypatch.context() as patch:  # scoring never decodes: nothing to compile
        patch.setattr(Engine, "warm_up", lambda engine: warmed.append(engine))
        status, stdout, err = n3_cli(capsys, "eval", "perplexity", "-c", str(checkpoint), "--text",
                                      str(tmp_path / "text.txt"), "--window", "64", "--out", str(tmp_path / "ppl"))
    assert status == 0 and warmed == [], err
    assert "bits per byte" in stdout and json.loads((tmp_path / "ppl/perplexity.json").read_text())["window"] == 64
    status, stdout, err = n3_cli(capsys, "eval", "throughput", "-c", str(checkpoint), "--shapes", "32:4,48:2",
                                  "--concurrency", "2", "--requests", "2", "--set", "serve.compile=false",
                                  "--out", str(tmp_path / "tp"))
    assert status == 0, err
    results = json.loads((tmp_path / "tp/throughput.json").read_text())["results"]
    assert [(r["input_len"], r["output_len"]) for r in results] == [(32, 4), (48, 2)] and "32/4" in stdout
    status, stdout, err = n3_cli(capsys, "eval", "mtp", "-c", str(checkpoint), "--depth", "2", "--prompts", "2",
                                  "--prompt-len", "16", "--max-tokens", "6", "--set", "serve.compile=false",
                                  "--out", str(tmp_path / "mtp"))
    assert status == 0, err
    runs = json.loads((tmp_path / "mtp/mtp.json").read_text())["runs"]
    assert [r["temperature"] for r in runs] == [0.0, 1.0] and all(len(r["per_depth"]) == 2 for r in runs)
    assert "language reference" in stdout and "speedup" in stdout
    status, stdout, err = n3_cli(capsys, "eval", "mtp", "-c", str(checkpoint), "--env", "math:1", "--depth", "1",
                                  "--prompts", "2", "--max-tokens", "4", "--temperature", "0", "--set", "serve.compile=false",
                                  "--out", str(tmp_path / "mtp-chat"))
    assert status == 0, err
    runs = json.loads((tmp_path / "mtp-chat/mtp.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["prompts"] == 2 and "held-out prompts of math:1" in stdout
    status, stdout, err = n3_cli(capsys, "eval", "tasks", "-c", str(checkpoint), "--tasks", "math:1,code:1",
                                  "--samples", "2", "--max-tokens", "8", "--set", "serve.compile=false",
                                  "--out", str(tmp_path / "tasks"))
    assert status == 0, err
    results = json.loads((tmp_path / "tasks/tasks.json").read_text())["results"]
    assert [(r["domain"], r["reasoning"], r["problems"]) for r in results] == [
        ("math", "on", 2), ("math", "off", 2), ("code", "on", 2), ("code", "off", 2)]
    assert "Held-out tasks" in stdout and len((tmp_path / "tasks/predictions.jsonl").read_text().splitlines()) == 8


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("N3_DEBUG", raising=False)
    for args, message in [
        (["ruler"], "give --checkpoint DIR or --endpoint URL"),
        (["ruler", "-c", str(checkpoint), "--endpoint", "http://x"], "not both"),
        (["ruler", "-c", str(checkpoint), "--lengths", "4q"], "not a length"),
        (["ruler", "-c", str(checkpoint), "--tasks", "nope"], "unknown RULER task"),
        (["tasks", "-c", str(checkpoint), "--tasks", "chess"], "unknown task 'chess'"),
        (["tasks", "-c", str(checkpoint), "--tasks", "math:9"], "math has levels 1, 2, 3, 4, 5"),
        (["tasks", "-c", str(checkpoint), "--reasoning", "maybe"], "--reasoning 'maybe'"),
        (["perplexity", "-c", str(checkpoint)], "give --text FILE or --data DIR"),
        (["perplexity", "-c", str(checkpoint), "--text", "missing.txt"], "no such file"),
        (["throughput", "-c", str(checkpoint), "--shapes", "8k"], "INPUT:OUTPUT"),
        (["ruler", "--endpoint", "http://127.0.0.1:9"], "needs --tokenizer"),
        (["ruler", "--endpoint", "http://127.0.0.1:9", "--tokenizer", str(checkpoint)], "cannot reach"),
    ]:
        status, _, err = n3_cli(capsys, "eval", *args)
        assert status == 2 and message in err and err.count("\n") == 1, (args, err)
    plain = tmp_path / "plain"
    n3.save_pretrained(random_model(pattern="M*E", vocab_size=512), plain)
    status, _, err = n3_cli(capsys, "eval", "mtp", "-c", str(plain))
    assert status == 2 and "has no tokenizer.json" in err
