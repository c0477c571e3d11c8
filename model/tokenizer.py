"""Tokenizer: a byte-level BPE `tokenizers.Tokenizer` with n3's reserved tokens and the Nemotron chat template.

A checkpoint carries `tokenizer.json` and `tokenizer_config.json`, so transformers' AutoTokenizer (and vLLM) load it,
with the chat template as jinja. A released Nemotron tokenizer.json loads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from model.errors import UserError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END, THINK, END_THINK, "<tool_call>", "</tool_call>"]
"""Reserved in this order when n3 trains a tokenizer: pad 0, bos 1, eos 2, as NemotronH configs default to."""

# The same template as `render_chat`, for transformers' apply_chat_template and vLLM. Reasoning is on unless the
# latest /think or /no_think flag in a system or user turn says off.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(think=true) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] in ['system', 'user'] -%}"
    "{%- if '/no_think' in m['content'] -%}{%- set ns.think = false -%}"
    "{%- elif '/think' in m['content'] -%}{%- set ns.think = true -%}{%- endif -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' + ('<think>\\n' if ns.think else '<think></think>') -}}"
    "{%- endif -%}"
)


def thinking_enabled(messages: list[dict]) -> bool:
    """Reasoning is on unless the latest /think or /no_think in a system or user turn turns it off."""
    think = True
    for m in messages:
        if m["role"] in ("system", "user"):
            if "/no_think" in m["content"]:
                think = False
            elif "/think" in m["content"]:
                think = True
    return think


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat prompt as text: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then the assistant header
    opening its reasoning with `<think>\\n` (on) or closing it at once with `<think></think>` (off)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n" + (f"{THINK}\n" if thinking_enabled(messages) else f"{THINK}{END_THINK}")
    return text


class Tokenizer:
    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        self.pad_id = self.token_id(PAD, fallback=self.token_id(EOS))
        self.bos_id = self.token_id(BOS)
        self.eos_id = self.token_id(EOS)
        self.im_end_id = self.token_id(IM_END)
        self.think_id = self.token_id(THINK)
        self.end_think_id = self.token_id(END_THINK)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a tokenizer.json file or a directory holding one (a checkpoint)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"no tokenizer.json at {path}")
        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as err:  # tokenizers raises plain Exception subclasses for malformed files
            raise UserError(f"cannot read tokenizer {file}: {err}") from None

    def save(self, directory: str | Path) -> None:
        """tokenizer.json plus the tokenizer_config.json that transformers' AutoTokenizer reads (the directory is made
        if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS if self.bos_id is not None else None,
            "eos_token": EOS if self.eos_id is not None else None,
            "pad_token": self.backend.id_to_token(self.pad_id) if self.pad_id is not None else None,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": 1 << 30,
            "chat_template": CHAT_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

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

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(render_chat(messages, add_generation_prompt))
