"""RULER's task generators and scoring, without a model: prompts are deterministic and fill their target length
(within 5%, never over), needles sit at their depths, an oracle that reads the answers off the prompt scores 100 and
a constant answer scores near 0, QA runs from SQuAD/HotpotQA files or is skipped, scoring matches hand-computed
cases."""

import json
import re
from collections import Counter

import pytest

from model.errors import UserError
from stages.eval.corpus import sentences
from stages.eval.ruler import TASKS, RulerOptions, run_ruler, samples
from stages.eval.ruler.niah import DEPTHS
from stages.eval.ruler.samples import fit
from stages.eval.ruler.scoring import clean, string_match_all, string_match_part
from stages.rollout.backend import Backend

SYNTHETIC = [t for t in TASKS if not t.startswith("qa")]


class Scripted(Backend):
    """A backend whose answers come from a function of the prompt text (decoded from the ids sent)."""

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer = tokenizer, answer
        self.description, self.context, self.batch_size = "scripted", None, 7

    def generate(self, prompts, max_tokens, stop=None, temperature=0.0):
        return [self.answer(self.tokenizer.decode(p)) for p in prompts]

    def chat(self, conversations, max_tokens, temperature=0.0, **template_kwargs):
        raise NotImplementedError

    def score(self, sequences):
        raise NotImplementedError

    def timed(self, prompts, max_tokens, concurrency):
        raise NotImplementedError

    def rollout(self, conversations, max_tokens, n=1, **sampling):
        raise NotImplementedError("ruler samples nothing")

    def update_weights(self, path):
        raise NotImplementedError("ruler loads no weights")


def last(pattern: str, text: str) -> str:
    return re.findall(pattern, text, flags=re.S)[-1]


def oracle(text: str) -> str:
    """Solve a RULER prompt by reading it (the tasks' answers must be extractable from what the model sees)."""
    if "special magic" in text:
        query = last(r"for (.+?) mentioned in the provided text", text)
        keys = re.split(r", and |, ", query)
        return " ".join(v for key in keys for v in re.findall(
            rf"One of the special magic \w+ for {re.escape(key)} is: ([\w-]+)\.", text))
    if "variable assignment" in text:
        main = text[text.rindex("Memorize and track"):]
        value = last(r"assigned the value (\d+) in the text above", main)
        names = re.findall(rf"VAR (\w+) = {value}\b", main)
        links = re.findall(r"VAR (\w+) = VAR (\w+)", main)
        while True:
            more = [b for b, a in links if a in names and b not in names]
            if not more:
                return " ".join(names)
            names += more
    if "numbered list of words" in text:
        listing = last(r"Memorize the ones that appear most often\.\n(.*?)\nQuestion:", text)
        words = re.findall(r"\d+\. (.+?)(?= \d+\. |$)", listing)
        return " ".join(w for w, _ in Counter(words).most_common(10))
    coded = last(r"three most frequently appeared coded words\. (.*?)\nQuestion:", text)
    return " ".join(w for w, _ in Counter(w for w in coded.split() if w != "...").most_common(3))


@pytest.fixture(scope="module")
def generated(tokenizer):
    backend = Scripted(tokenizer, oracle)
    return list(samples(backend, RulerOptions([1024, 2048], 3, SYNTHETIC[:8] + ["vt", "fwe"]))) + list(
        samples(backend, RulerOptions([2048], 3, ["cwe"])))


def test_generation_is_deterministic_and_seeded(tokenizer, generated):
    backend = Scripted(tokenizer, oracle)
    again = list(samples(backend, RulerOptions([1024], 3, ["niah_multikey_2", "vt"])))
    first = [s for s in generated if s.length == 1024 and s.task in ("niah_multikey_2", "vt")]
    assert [s.prompt for s in again] == [s.prompt for s in first]
    other = list(samples(backend, RulerOptions([1024], 3, ["niah_multikey_2", "vt"], seed=7)))
    assert all(a.prompt != b.prompt for a, b in zip(other, first))
    # A sample depends only on (seed, task, length, index), not on what else runs.
    alone = list(samples(backend, RulerOptions([1024], 1, ["vt"])))
    assert alone[0].prompt == first[3].prompt


def test_lengths_fill_the_target_within_5_percent(generated):
    assert {s.task for s in generated} == set(SYNTHETIC)
    for s in generated:
        total = len(s.prompt) + s.max_tokens
        assert 0.95 * s.length <= total <= s.length, (s.task, s.length, total)
        assert s.max_tokens == {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                                "freq_words_extraction": 50}[TASKS[s.task].family]


def units_before(context: str, needle: str, needles: list[str], essay: bool) -> tuple[int, int]:
    """(haystack units before the needle, haystack units in all): sentences of an essay, lines otherwise."""
    def count(text: str) -> int:
        for other in needles:
            text = text.replace(other, "")
        return len(sentences(text)) if essay else sum(1 for line in text.split("\n") if line)

    return count(context[: context.index(needle)]), count(context)


def test_needles_sit_at_their_depths(generated):
    """Each needle goes in front of haystack unit int(units x depth / 100), depths drawn from 40 evenly spaced."""
    niah = [s for s in generated if TASKS[s.task].family == "niah"]
    assert len(niah) == 8 * 2 * 3
    depths_seen = set()
    for s in niah:
        context = s.text[s.text.index("afterwards.\n") + 12 : s.text.rindex("\nWhat")]
        needles, depths = s.meta["needles"], s.meta["depths"]
        assert len(needles) == len(depths) == len(set(depths)) and depths == sorted(depths)
        for needle, depth in zip(needles, depths):
            before, total = units_before(context, needle, needles, TASKS[s.task].args["haystack"] == "essay")
            assert total >= 3 and before == int(total * depth / 100), (s.task, depth, before, total)
            depths_seen.add(depth)
        answer = oracle(s.text).split()
        assert sorted(answer) == sorted(s.answers)
    assert depths_seen <= set(DEPTHS) and len(depths_seen) > 20 and DEPTHS[:3] == [0, 3, 5] and DEPTHS[-1] == 100


def test_templates_follow_ruler(generated):
    by_task = {s.task: s for s in generated}
    single = by_task["niah_single_1"].text
    assert single.startswith("A special magic number is hidden within the following text.")
    assert re.search(r"What is the special magic number for [\w -]+ mentioned in the provided text\? The special "
                     r"magic number for [\w -]+ mentioned in the provided text is$", single)
    assert "The grass is green. The sky is blue." in single
    multi = by_task["niah_multivalue"].text
    assert multi.startswith("Some special magic numbers are hidden") and multi.endswith("provided text are")
    assert len(by_task["niah_multiquery"].answers) == 4 and ", and " in by_task["niah_multiquery"].text
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        by_task["niah_multikey_3"].answers[0])
    assert all(re.fullmatch(r"\d{7}", a) for a in by_task["niah_multikey_1"].answers)
    vt = by_task["vt"]
    assert len(vt.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", a) for a in vt.answers)
    value = last(rf"VAR {vt.answers[0]} = (\d+)", vt.text)
    assert vt.text.endswith(f"5 variables are assgined the value {value}, they are: ")
    assert by_task["cwe"].text.endswith("Answer: The top 10 words that appear most often in the list are:")
    assert by_task["fwe"].text.endswith("the three most frequently appeared words are:")


def test_chat_mode_wraps_the_task_in_the_chat_template(tokenizer):
    backend = Scripted(tokenizer, oracle)
    options = RulerOptions([1024], 2, ["niah_single_1", "vt"], chat=True)
    for s in samples(backend, options):
        assert s.text.startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n<think></think>" in s.text
        assert 0.95 * 1024 <= len(s.prompt) + s.max_tokens <= 1024
    value = last(r"the value (\d+) in", s.text)
    assert s.text.endswith("<think></think>Answer: According to the chain(s) of variable assignment in the text "
                           f"above, 5 variables are assgined the value {value}, they are: ")
    assert run_ruler(backend, options).mean(1024) == 100


def test_an_oracle_scores_100_and_a_constant_answer_scores_low(tokenizer):
    options = RulerOptions([1024], 2, SYNTHETIC[:8] + ["vt", "fwe"])
    perfect = run_ruler(Scripted(tokenizer, oracle), options)
    assert perfect.scores.keys() == set(options.tasks) and perfect.mean(1024) == 100
    assert set(perfect.skipped) == set() and "language reference" in perfect.haystack
    constant = run_ruler(Scripted(tokenizer, lambda text: "1234567 the answer"), options)
    assert constant.mean(1024) < 5
    assert len(constant.predictions) == 20 and {p["score"] for p in constant.predictions} == {0.0}
    summary = constant.summary()
    assert summary["mean"] == {"1024": constant.mean(1024)} and summary["tasks_in_mean"] == 10
    assert summary["tasks"]["vt"]["metric"] == "string_match_all"


def test_fit_finds_the_largest_size_within_budget():
    calls = []

    def measure(n: int) -> int:
        calls.append(n)
        return 3 * n + 10

    assert fit(measure, 100, None) == 30 and len(calls) < 12
    assert fit(measure, 100, 20) == 20 and fit(measure, 100, 40) == 30
    assert fit(measure, 9, None) == -1 and fit(measure, 10, None) == 0
    assert fit(lambda n: 5 * n, 10**6, None) == 200_000


def test_scoring_matches_hand_computed_cases():
    assert clean("  Apple\tand\x00banana \n") == "Apple\nand\nbanana"
    prediction = "The numbers are 1234567, apple-pie and BANANA."
    assert string_match_all(prediction, ["1234567", "Apple-Pie", "cherry"]) == pytest.approx(2 / 3)
    assert string_match_all(prediction, ["banana"]) == 1.0
    assert string_match_part(prediction, ["cherry", "banana"]) == 1.0
    assert string_match_part(prediction, ["cherry", "plum"]) == 0.0
    assert TASKS["qa_1"].spec.metric is string_match_part and TASKS["niah_single_1"].spec.metric is string_match_all


def test_qa_runs_from_files_and_is_skipped_without(tmp_path, tokenizer):
    squad = {"data": [{"paragraphs": [
        {"context": f"Paragraph {a}.{p}: the river {a}{p} flows north past the mill of Sir Keeper{a}{p}.",
         "qas": [{"question": f"Who keeps the mill on river {a}{p}?", "answers": [{"text": f"Sir Keeper{a}{p}"}],
                  "is_impossible": False},
                 {"question": f"What is unknown about {a}{p}?", "answers": [], "is_impossible": True}]}
        for p in range(3)]} for a in range(4)]}
    hotpot = [{"question": f"Which town hosts fair {i}?", "answer": f"Town{i}",
               "context": [[f"Fair {i}", [f"Fair {i} is held ", f"in Town{i}."]], [f"Other {i}", ["Nothing here."]]]}
              for i in range(5)]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    answers = {f"Who keeps the mill on river {a}{p}?": f"Sir Keeper{a}{p}" for a in range(4) for p in range(3)}
    answers |= {item["question"]: item["answer"] for item in hotpot}
    reader = Scripted(tokenizer, lambda text: "It is " + answers.get(last(r"Question: (.*?) Answer:", text), "?"))
    options = RulerOptions([1024], 4, ["qa_1", "qa_2"], squad=tmp_path / "squad.json", hotpotqa=tmp_path / "hotpot.json")
    result = run_ruler(reader, options)
    assert result.scores == {"qa_1": {1024: 100.0}, "qa_2": {1024: 100.0}} and result.haystack is None
    assert "qa_2" in [task for task, _, _ in result.short()]  # its 10 documents cannot fill 1024 tokens
    for s in samples(reader, options):
        assert s.max_tokens == 32 and s.text.endswith(" Answer:") and "unknown" not in s.text
        # Filler comes in whole documents (about 35 tokens each here); HotpotQA here has only 10 of them.
        assert 1024 - 64 <= len(s.prompt) + 32 <= 1024 or s.task == "qa_2"
        gold = [s.text.split(f"Document {k}:\n", 1)[1].split("\n\nDocument")[0] for k in s.meta["gold"]]
        assert any(s.answers[0] in document for document in gold)
    skipped = run_ruler(reader, RulerOptions([1024], 1, ["qa_1", "qa_2", "fwe"]))
    assert skipped.skipped == {"qa_1": "no SQuAD file (--squad FILE)", "qa_2": "no HotpotQA file (--hotpotqa FILE)"}
    assert list(skipped.scores) == ["fwe"]
    with pytest.raises(UserError, match="every task was skipped"):
        run_ruler(reader, RulerOptions([1024], 1, ["qa_1"]))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not SQuAD JSON"):
        run_ruler(reader, RulerOptions([1024], 1, ["qa_1"], squad=tmp_path / "bad.json"))


def test_a_haystack_folder_replaces_the_built_in_corpus(tmp_path, tokenizer):
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "a.txt").write_text("Zebras wander the quiet plain at dusk. " * 15)
    (tmp_path / "essays" / "b.txt").write_text("Lighthouses keep ships from the rocks. " * 15)
    options = RulerOptions([2048], 1, ["niah_single_2"], haystack=tmp_path / "essays")
    [sample] = samples(Scripted(tokenizer, oracle), options)
    assert "Zebras wander" in sample.text and "Lighthouses" in sample.text and "Python" not in sample.text
    result = run_ruler(Scripted(tokenizer, oracle), options)
    assert result.haystack.startswith(f"{tmp_path / 'essays'}: 2 .txt file(s)")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="give at least 100"):
        run_ruler(Scripted(tokenizer, oracle), RulerOptions([1024], 1, ["niah_single_2"], haystack=tmp_path / "empty"))


def test_bad_options_are_user_errors(tokenizer):
    with pytest.raises(UserError, match="unknown RULER task"):
        RulerOptions([1024], 1, ["niah_single_9"])
    with pytest.raises(UserError, match="too short for niah_single_1"):
        run_ruler(Scripted(tokenizer, oracle), RulerOptions([128], 1, ["niah_single_1"]))
    backend = Scripted(tokenizer, oracle)
    backend.context = 1000
    with pytest.raises(UserError, match="exceeds the context"):
        run_ruler(backend, RulerOptions([1024], 1, ["vt"]))
