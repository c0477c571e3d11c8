"""Tokenizer: a byte-level BPE `tokenizers.Tokenizer` with its special tokens and its chat template (model.chat).

A checkpoint carries `tokenizer.json` and `tokenizer_config.json`, so transformers' AutoTokenizer (and vLLM) load it,
with the chat template as jinja. A released Nemotron tokenizer loads the same way, with its own template and special
tokens; a tokenizer n3 trained (n3's reserved tokens first) without a template gets n3's (model.chat.N3_TEMPLATE).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from model.chat import N3_TEMPLATE, TOKENIZER_CONFIG, ChatTemplate
from model.errors import UserError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END, THINK, END_THINK, "<tool_call>", "</tool_call>"]
"""Reserved in this order when n3 trains a tokenizer: pad 0, bos 1, eos 2, as NemotronH configs default to."""



class Tokenizer:
    def __init__(self, backend: HFTokenizer, chat_template: ChatTemplate | None = None,
                 special_tokens: dict[str, str] | None = None):
        """`special_tokens` maps bos_token / eos_token / pad_token to their strings (tokenizer_config.json's names);
        n3's names stand in for those it lacks."""
        self.backend = backend
        names = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD} | (special_tokens or {})
        self.bos_id = self.token_id(names["bos_token"])
        self.eos_id = self.token_id(names["eos_token"])
        self.pad_id = self.token_id(names["pad_token"], fallback=self.eos_id)
        self.im_end_id = self.token_id(IM_END)
        self.think_id = self.token_id(THINK)
        self.end_think_id = self.token_id(END_THINK)
        if chat_template is None and self.trained_by_n3:
            chat_template = ChatTemplate(N3_TEMPLATE, self.special_tokens())
        self.chat_template = chat_template
        """How conversations render (model.chat); None for a tokenizer without one."""

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a tokenizer.json file or a directory holding one (a checkpoint), with the chat template and special
        tokens of the tokenizer_config.json (or chat_template.jinja) beside it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer.json at {path}")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises plain Exception subclasses for malformed files
            raise UserError(f"cannot read tokenizer {file}: {err}") from None
        template = ChatTemplate.from_directory(file.parent)
        config = file.parent / TOKENIZER_CONFIG
        special = template.special_tokens if template else ChatTemplate.special_tokens_of(config)
        return cls(backend, template, special)

    @property
    def trained_by_n3(self) -> bool:
        """The vocabulary starts with n3's reserved tokens, in order (what `n3 data` trains)."""
        return all(self.backend.id_to_token(i) == token for i, token in enumerate(SPECIAL_TOKENS))

    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, pad_token as strings, for those this tokenizer has."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        return {name: self.backend.id_to_token(i) for name, i in ids.items() if i is not None}

    def save(self, directory: str | Path) -> None:
        """tokenizer.json plus the tokenizer_config.json that transformers' AutoTokenizer reads, with the chat
        template (the directory is made if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens(),
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": 1 << 30,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template.source
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2))

    def token_id(self, token: str, fallback: int | None = None) -> int | None:
        found = self.backend.token_to_id(token)
        return fallback if found is None else found

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings in it (chat markers) become their ids. Adds no bos/eos."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **template_kwargs) -> str:
        """The conversation in this tokenizer's chat template (template_kwargs: enable_thinking, ...)."""
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template (tokenizer_config.json has no chat_template)")
        return self.chat_template.render(messages, add_generation_prompt, tools, **template_kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **template_kwargs) -> list[int]:
        """Token ids of `render_chat`, as transformers' apply_chat_template(tokenize=True) gives them."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools, **template_kwargs))

    def opens_thought(self, prompt: str) -> bool:
        """Whether a rendered prompt ends inside an open thought (`<think>\\n`): the reply starts with reasoning."""
        return self.end_think_id is not None and prompt.endswith(THINK + "\n")
