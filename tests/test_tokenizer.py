"""The tokenizer wrapper: reserved ids, round trips, the chat template against transformers' rendering of its jinja."""

import pytest

from model.errors import UserError
from model.tokenizer import Tokenizer, render_chat


def test_reserved_ids_and_round_trip(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    text = "The sky is blue. <think>why</think> 1234567"
    ids = tokenizer.encode(text)
    assert tokenizer.think_id in ids and tokenizer.end_think_id in ids
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "messages,opens",
    [
        ([{"role": "user", "content": "hi"}], "<think>\n"),
        ([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi"}], "<think></think>"),
        ([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi /think"}], "<think>\n"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c /no_think"}], "<think></think>"),
    ],
)
def test_chat_template_matches_transformers(tokenizer, tmp_path, messages, opens):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = render_chat(messages)
    assert ours.endswith("<|im_start|>assistant\n" + opens)
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours
    assert theirs.encode(ours) == tokenizer.encode_chat(messages)
    assert render_chat(messages, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)
