"""The chat renderer (model.chat): n3's own template and the released Nemotron 3 templates give the token ids
transformers' apply_chat_template gives, for multi-turn, tool and reasoning on/off conversations; how templates are
found and how a broken one fails."""

import json
from pathlib import Path

import pytest

from model.chat import N3_TEMPLATE, ChatTemplate
from model.errors import UserError
from model.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 + 3?"}],
    "multi-turn reasoning": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "reasoning_content": "2 plus 3 is 5.", "content": "\\boxed{5}"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "reasoning_content": "4 plus 4 is 8.", "content": "\\boxed{8}"},
    ],
    "reasoning off": [
        {"role": "user", "content": "Name a colour. /no_think"},
        {"role": "assistant", "content": "Blue."},
    ],
    "flags": [
        {"role": "system", "content": "/no_think"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "think now /think"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "I should look it up.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "20 C"},
        {"role": "assistant", "reasoning_content": "The tool says sunny.", "content": "Sunny, 20 C."},
    ],
}
SWITCHES = [{}, {"enable_thinking": False}, {"truncate_history_thinking": False}]


def with_template(tokenizer: Tokenizer, folder: Path, source: str | list | None) -> Tokenizer:
    """The session tokenizer saved to `folder` with `source` as its chat template (None: n3's), loaded back."""
    tokenizer.save(folder)
    if source is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": source}))
    return Tokenizer.load(folder)


def released_templates() -> dict[str, str]:
    """The Nemotron 3 chat templates as the released checkpoints ship them (TRL keeps copies)."""
    trl = pytest.importorskip("trl")
    folder = Path(trl.__file__).parent / "chat_templates"
    return {name: (folder / f"{name}.jinja").read_text() for name in
            ("nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra")}


@pytest.mark.parametrize("template", ["n3", "nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra"])
def test_token_ids_equal_transformers(tokenizer, tmp_path, template):
    transformers = pytest.importorskip("transformers")
    source = None if template == "n3" else released_templates()[template]
    ours = with_template(tokenizer, tmp_path, source)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for name, messages in CONVERSATIONS.items():
        for tools in (None, TOOLS):
            for switches in SWITCHES:
                for generation in (True, False):
                    expected = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=generation,
                                                          tokenize=True, return_dict=False, **switches)
                    got = ours.encode_chat(messages, generation, tools, **switches)
                    assert got == expected, (name, tools is not None, switches, generation)


def test_n3_template_follows_the_nemotron_conventions(tokenizer):
    render = tokenizer.render_chat
    turns = CONVERSATIONS["multi-turn reasoning"]
    text = render(turns, add_generation_prompt=False)
    # History before the last user turn keeps only the answer; the last turn keeps its reasoning.
    assert "<|im_start|>assistant\n<think></think>\\boxed{5}<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n4 plus 4 is 8.\n</think>\n\\boxed{8}<|im_end|>\n")
    kept = render(turns, add_generation_prompt=False, truncate_history_thinking=False)
    assert "<think>\n2 plus 3 is 5.\n</think>\n\\boxed{5}" in kept
    assert render(CONVERSATIONS["single"]).endswith("<|im_start|>assistant\n<think>\n")
    assert render(CONVERSATIONS["single"], enable_thinking=False).endswith("<|im_start|>assistant\n<think></think>")
    assert render(CONVERSATIONS["reasoning off"][:1]).endswith("<think></think>")
    assert render(CONVERSATIONS["flags"]).endswith("<think>\n")  # the latest flag wins
    tools = render(CONVERSATIONS["tools"], add_generation_prompt=False, tools=TOOLS)
    assert tools.startswith("<|im_start|>system\n# Tools\n\n<tools>\n<function>\n<name>get_weather</name>")
    assert ("<think>\nI should look it up.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
            "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n") in tools
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20 C\n</tool_response>\n" \
           "<|im_end|>\n" in tools
    assert tokenizer.opens_thought(render(CONVERSATIONS["single"]))
    assert not tokenizer.opens_thought(render(CONVERSATIONS["single"], enable_thinking=False))


def test_where_templates_come_from(tokenizer, tmp_path):
    plain = with_template(tokenizer, tmp_path / "plain", "{{ messages[0]['content'] }}")
    assert plain.render_chat(CONVERSATIONS["single"]) == "What is 2 + 3?"
    (tmp_path / "plain" / "chat_template.jinja").write_text("{{ bos_token }}jinja file")  # wins over the config
    assert Tokenizer.load(tmp_path / "plain").render_chat(CONVERSATIONS["single"]) == "<s>jinja file"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]
    assert with_template(tokenizer, tmp_path / "named", named).render_chat(CONVERSATIONS["single"]) == "default"
    assert Tokenizer.load(tmp_path / "named" / "tokenizer.json").chat_template.source == "default"
    saved = with_template(tokenizer, tmp_path / "n3", None)
    assert saved.chat_template.source == N3_TEMPLATE


def test_a_tokenizer_without_a_template(tokenizer, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    foreign = Tokenizer(HFTokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])))
    assert foreign.chat_template is None and not foreign.trained_by_n3
    with pytest.raises(UserError, match="no chat template"):
        foreign.render_chat(CONVERSATIONS["single"])
    assert tokenizer.trained_by_n3 and tokenizer.chat_template.source == N3_TEMPLATE


def test_broken_templates_are_user_errors(tokenizer, tmp_path):
    with pytest.raises(UserError, match="does not compile"):
        ChatTemplate("{% for %}", origin="broken.json")
    raising = ChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(UserError, match="fails on this conversation: TemplateError: only user turns"):
        raising.render(CONVERSATIONS["single"])
    with pytest.raises(UserError, match="fails on this conversation"):
        ChatTemplate("{{ messages[5]['content'] + 1 }}").render(CONVERSATIONS["single"])
