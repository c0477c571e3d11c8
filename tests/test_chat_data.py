"""Chat data for fine-tuning (stages/chat): loss masks against hand-built expectations, in n3's template and in the
released Nemotron 3 template; rows and their errors; chat files in every format; the reasoning mix; best-fit packing
and the step source."""

import json
import random

import numpy as np
import pytest

from kernels.cross_entropy import IGNORE
from model.errors import UserError
from stages.chat.masks import Sample, conversation_samples
from stages.chat.packing import PackedChatBatches, interleave, pack
from stages.chat.reasoning import ReasoningMix
from stages.chat.rows import Conversation, RowError, parse_row
from stages.chat.sources import parse_chat_sources, read_source
from tests.test_chat import TOOLS, released_templates, with_template

REASONING_TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "reasoning_content": "2 plus 3 is 5.", "content": "\\boxed{5}"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "reasoning_content": "4 plus 4 is 8.", "content": "\\boxed{8}"},
]
PLAIN_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Look it up.", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "reasoning_content": "It is sunny.", "content": "Sunny."},
]


def trained_text(sample: Sample, tokenizer) -> list[str]:
    """The runs of trained tokens, decoded."""
    runs, current = [], []
    for token, trained in zip(sample.ids.tolist(), sample.trained.tolist()):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def samples(tokenizer, messages, tools=None, **options):
    return conversation_samples(Conversation(parse_row({"messages": messages}).messages, tools), tokenizer, **options)


def test_masks_in_the_n3_template(tokenizer):
    # Without reasoning every assistant turn trains in one sample; the empty <think></think> the template adds does not.
    (plain,) = samples(tokenizer, PLAIN_TURNS)
    assert trained_text(plain, tokenizer) == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    assert tokenizer.decode(plain.ids.tolist()) == tokenizer.render_chat(PLAIN_TURNS, add_generation_prompt=False)
    # History reasoning is dropped by the template: each turn trains in the conversation up to the next user turn.
    first, second = samples(tokenizer, REASONING_TURNS)
    assert trained_text(first, tokenizer) == ["2 plus 3 is 5.\n</think>\n\\boxed{5}<|im_end|>"]
    assert trained_text(second, tokenizer) == ["4 plus 4 is 8.\n</think>\n\\boxed{8}<|im_end|>"]
    assert "<think></think>\\boxed{5}" in tokenizer.decode(second.ids.tolist())  # turn 1 as history: context only
    (final,) = samples(tokenizer, REASONING_TURNS, train_on="final")
    assert trained_text(final, tokenizer) == trained_text(second, tokenizer)
    (everything,) = samples(tokenizer, REASONING_TURNS, train_on="all")
    assert everything.trained.all()
    without = samples(tokenizer, REASONING_TURNS, reasoning_loss=False)
    assert [trained_text(s, tokenizer) for s in without] == [["\n\\boxed{5}<|im_end|>"], ["\n\\boxed{8}<|im_end|>"]]
    # The same conversation with the history kept: one sample trains both turns.
    (kept,) = samples(tokenizer, REASONING_TURNS, template_kwargs={"truncate_history_thinking": False})
    assert len(trained_text(kept, tokenizer)) == 2


def test_masks_of_tool_calls_and_truncated_reasoning(tokenizer):
    (tools,) = samples(tokenizer, TOOL_TURNS, tools=TOOLS)
    assert trained_text(tools, tokenizer) == [
        "Look it up.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>\n<|im_end|>",
        "It is sunny.\n</think>\nSunny.<|im_end|>",
    ]
    cut = [{"role": "user", "content": "q"},
           {"role": "assistant", "reasoning_content": "a long", "content": "x", "reasoning_truncated": True}]
    (truncated,) = samples(tokenizer, cut)
    assert trained_text(truncated, tokenizer) == ["a long\n", "\nx<|im_end|>"]  # the forced </think> is not trained
    assert samples(tokenizer, [{"role": "user", "content": "no answer"}]) == []


@pytest.mark.parametrize("template", ["nemotron_3_nano", "nemotron_3_ultra"])
def test_masks_in_the_released_templates(tokenizer, tmp_path, template):
    released = with_template(tokenizer, tmp_path, released_templates()[template])
    first, second = samples(released, REASONING_TURNS)
    assert [t.replace("\n", "") for t in trained_text(first, released)] == ["2 plus 3 is 5.</think>\\boxed{5}<|im_end|>"]
    assert [t.replace("\n", "") for t in trained_text(second, released)] == ["4 plus 4 is 8.</think>\\boxed{8}<|im_end|>"]
    (plain,) = samples(released, PLAIN_TURNS)
    assert trained_text(plain, released) == ["Blue.<|im_end|>", "Green.<|im_end|>"]
    (tools,) = samples(released, TOOL_TURNS, tools=TOOLS)
    assert len(trained_text(tools, released)) == 2 and "<function=get_weather>" in trained_text(tools, released)[0]


def test_rows_are_checked_with_the_path_of_the_bad_value():
    cases = [
        ([], "row"),
        ({"text": "hi"}, "row"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "reasoning_content": "y"}]}, "messages[0].reasoning_content"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": "f"}, "tools"),
    ]
    for row, where in cases:
        with pytest.raises(RowError) as error:
            parse_row(row)
        assert error.value.where == where, row
    parsed = parse_row({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                     {"role": "assistant", "reasoning": "r", "content": None,
                                      "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}]})
    assert parsed.messages[0] == {"role": "system", "content": "a"}
    assert parsed.messages[1]["reasoning_content"] == "r" and parsed.messages[1]["content"] == ""
    assert parsed.messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}


def test_chat_files_in_every_format(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "chats.json").write_text(json.dumps(rows))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    for name in ("chats.jsonl", "chats.json", "chats.parquet", "saved", "splits"):
        (source,) = parse_chat_sources([f"s={tmp_path / name}"])
        conversations, skipped = read_source(source)
        assert [c.messages[1]["content"] for c in conversations] == [f"a{i}" for i in range(5)] and skipped == 0, name
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text((tmp_path / "chats.jsonl").read_text())
    assert len(read_source(parse_chat_sources([str(folder)])[0])[0]) == 5


def test_bad_chat_data_names_the_file_and_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n" + good + "\n")
    (source,) = parse_chat_sources([str(bad)])
    with pytest.raises(UserError, match=r"bad.jsonl:2: messages\[0\].role: must be one of"):
        read_source(source)
    conversations, skipped = read_source(source, skip_bad=True)
    assert len(conversations) == 2 and skipped == 1
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="broken.jsonl:1: not valid JSON"):
        read_source(parse_chat_sources([str(tmp_path / "broken.jsonl")])[0])
    with pytest.raises(UserError, match="does not exist"):
        parse_chat_sources([str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserError, match="no chat data source is named 'other'"):
        parse_chat_sources([str(bad)], {"other": 2.0})


def test_the_reasoning_mix_takes_exact_shares():
    conversations = [Conversation([{"role": "user", "content": f"q{i}"},
                                   {"role": "assistant", "reasoning_content": "one two three four", "content": "a"}])
                     for i in range(100)]
    conversations.append(Conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]))
    mixed, counts = ReasoningMix(off=0.1, truncated=0.05).apply(conversations, seed=3)
    assert counts == {"on": 85, "off": 10, "truncated": 5, "without": 1}
    answers = [c.messages[1] for c in mixed]
    assert sum("reasoning_content" not in m for m in answers) == 11
    cut = [m for m in answers if m.get("reasoning_truncated")]
    assert len(cut) == 5 and all(m["reasoning_content"] in ("one", "one two", "one two three") for m in cut)
    assert ReasoningMix(off=0.1, truncated=0.05).apply(conversations, seed=3)[0] == mixed  # seeded
    with pytest.raises(ValueError):
        ReasoningMix(off=0.8, truncated=0.3)


def fake_samples(lengths: list[int], prompt: str = "p") -> list[Sample]:
    return [Sample(np.arange(n) + 100 * i, np.arange(n) % 2 == 0, f"{prompt}{i}") for i, n in enumerate(lengths)]


def test_best_fit_packing():
    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(400)] + [600]
    rows = pack(fake_samples(lengths), seq_len=512, pad_id=0)
    assert rows.stats.too_long == 1 and rows.stats.samples == 400
    assert rows.stats.efficiency > 0.95
    for r in range(len(rows)):
        documents = np.unique(rows.seq_idx[r])
        for d in documents[:-1]:  # every sample whole, in its own document; labels only inside it, where trained
            where = np.flatnonzero(rows.seq_idx[r] == d)
            ids = rows.input_ids[r, where]
            assert np.array_equal(ids - ids[0], np.arange(len(where)))
            expected = np.where((np.arange(1, len(where)) % 2) == 0, ids[1:], IGNORE)
            assert np.array_equal(rows.labels[r, where[:-1]], expected) and rows.labels[r, where[-1]] == IGNORE
    # The same prompt never twice in a row: four samples that would fit together land in four rows.
    same = [Sample(np.arange(10), np.ones(10, bool), "same") for _ in range(4)]
    assert len(pack(same, seq_len=100, pad_id=0)) == 4


def test_sources_interleave_by_weight():
    a = fake_samples([5] * 10, "a")
    b = fake_samples([5] * 10, "b")
    stream = interleave([a, b], [1.0, 2.0], seed=0)
    kinds = "".join(s.prompt_key[0] for s in stream)
    assert kinds.count("a") == 10 and kinds.count("b") == 20
    assert all(kinds[i : i + 3].count("b") >= 1 for i in range(0, 27, 3))  # mixed throughout, not in blocks


def test_the_step_source_splits_ranks_like_accumulation_and_resumes():
    rows = pack(fake_samples([30] * 40), seq_len=64, pad_id=0)
    one = PackedChatBatches(rows, micro_batch=2, global_batch=4, seed=1)
    ranks = [PackedChatBatches(rows, micro_batch=2, global_batch=4, rank=r, world=2, seed=1) for r in range(2)]
    for _ in range(12):  # crosses an epoch boundary (20 rows, 4 per step)
        whole = one.next_step()
        parts = [r.next_step()[0] for r in ranks]
        assert all(np.array_equal(w.input_ids, p.input_ids) for w, p in zip(whole, parts))
        assert all(w.seq_idx is not None for w in whole)
    again = PackedChatBatches(rows, micro_batch=2, global_batch=4, seed=1)
    again.load_state_dict(one.state_dict())
    assert np.array_equal(again.next_step()[0].input_ids, one.next_step()[0].input_ids)
