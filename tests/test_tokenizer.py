"""The tokenizer wrapper: reserved ids, round trips, bad files (the chat template: tests/test_chat.py)."""

import pytest

from model.errors import UserError
from model.tokenizer import Tokenizer


def test_reserved_ids_and_round_trip(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    text = "The sky is blue. <think>why</think> 1234567"
    ids = tokenizer.encode(text)
    assert tokenizer.think_id in ids and tokenizer.end_think_id in ids
    assert tokenizer.decode(ids) == text


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)
