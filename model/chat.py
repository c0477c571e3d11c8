"""The chat renderer: a checkpoint's own jinja chat template, rendered as transformers' `apply_chat_template` renders
it, so a model trains, serves and is evaluated on exactly one format.

    template = ChatTemplate.from_directory(checkpoint)          # chat_template.jinja or tokenizer_config.json
    text = template.render(messages, add_generation_prompt=True, enable_thinking=False)

What transformers does, and so does this: a sandboxed jinja environment with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, `{% generation %}` blocks (training templates mark assistant output with them; they render
their body), a `tojson` filter that does not escape HTML, `raise_exception` and `strftime_now`; messages with their
None-valued keys dropped and reasoning passed as both `reasoning_content` and `thinking`; the tokenizer's special
tokens (`bos_token`, `eos_token`, ...) as template variables under the caller's keyword arguments.

`N3_TEMPLATE` is the template of tokenizers n3 trains. It follows the Nemotron 3 conventions (REFERENCE.md section 7):
ChatML turns; an assistant turn is `<think>\\n{reasoning}\\n</think>\\n{content}`, or `<think></think>{content}` without
reasoning; `truncate_history_thinking` (default on) keeps only `<think></think>` and the answer in assistant turns
before the last user turn; tool calls as `<tool_call>` blocks of `<function=NAME>` and `<parameter=KEY>`; consecutive
tool messages as one user turn of `<tool_response>` blocks; tools listed in the system turn. The generation prompt
opens a thought (`<think>\\n`) or closes it at once (`<think></think>`): on unless the latest `/think` or `/no_think` in a
system or user turn, or else `enable_thinking=False`, turns it off.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from model.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
"""Names a message's reasoning arrives under; templates read the first (gpt-oss ones the second)."""

N3_TEMPLATE = r"""
{%- set ns = namespace(last_user=-1, think=(enable_thinking if enable_thinking is defined else true)) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
  {%- if m.role in ['system', 'user'] and m.content is string -%}
    {%- if '/no_think' in m.content -%}{%- set ns.think = false -%}
    {%- elif '/think' in m.content -%}{%- set ns.think = true -%}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- set history = truncate_history_thinking if truncate_history_thinking is defined else true -%}
{%- set system = messages[0].content if messages and messages[0].role == 'system' else none -%}
{%- if system is not none or tools -%}
  {{- '<|im_start|>system\n' + (system or '') -}}
  {%- if tools -%}
    {{- ('\n\n' if system else '') + '# Tools\n\n<tools>' -}}
    {%- for tool in tools -%}
      {%- set f = tool.function if tool.function is defined else tool -%}
      {{- '\n<function>\n<name>' + f.name + '</name>' -}}
      {%- if f.description is defined -%}{{- '\n<description>' + f.description + '</description>' -}}{%- endif -%}
      {{- '\n<parameters>' + ((f.parameters if f.parameters is defined else {}) | tojson) + '</parameters>\n</function>' -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nTo call a function reply with:\n' -}}
    {{- '<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>' -}}
  {%- endif -%}
  {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- if m.role == 'system' and loop.first -%}
  {%- elif m.role == 'assistant' -%}
    {%- set keep = m.reasoning_content is string and m.reasoning_content | trim and not (history and loop.index0 < ns.last_user) -%}
    {%- set answer = ('<think>\n' + m.reasoning_content + '\n</think>\n' if keep else '<think></think>')
                     + (m.content if m.content is string else '') -%}
    {{- '<|im_start|>assistant\n' + answer | trim -}}
    {%- if m.tool_calls -%}
      {{- '\n' -}}
      {%- for call in m.tool_calls -%}
        {%- set f = call.function if call.function is defined else call -%}
        {{- '<tool_call>\n<function=' + f.name + '>\n' -}}
        {%- for key, value in (f.arguments | items if f.arguments is mapping else []) -%}
          {{- '<parameter=' + key + '>\n' + (value if value is string else value | tojson) + '\n</parameter>\n' -}}
        {%- endfor -%}
        {{- '</function>\n</tool_call>\n' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user\n' -}}{%- endif -%}
    {{- '<tool_response>\n' + (m.content or '') + '\n</tool_response>\n' -}}
    {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + m.role + '\n' + (m.content or '') + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' + ('<think>\n' if ns.think else '<think></think>') -}}
{%- endif -%}
"""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "n3"):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        """bos_token, eos_token, ... as the tokenizer names them: variables every render sees."""
        self.origin = origin
        """Where the template came from, for error messages."""
        try:
            self._compiled = _compile(source)
        except Exception as err:  # jinja's TemplateSyntaxError and whatever a broken template raises
            raise UserError(f"the chat template of {origin} does not compile: {' '.join(str(err).split())}") from None

    @classmethod
    def from_directory(cls, path: str | Path) -> ChatTemplate | None:
        """The template a tokenizer directory carries (`chat_template.jinja`, else tokenizer_config.json's
        `chat_template`, the default one of a named list), with its special tokens; None when it has none."""
        path = Path(path)
        config = _read_json(path / TOKENIZER_CONFIG)
        special = ChatTemplate.special_tokens_of(path / TOKENIZER_CONFIG)
        if (path / TEMPLATE_FILE).is_file():
            return cls((path / TEMPLATE_FILE).read_text(), special, str(path / TEMPLATE_FILE))
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        return cls(source, special, str(path / TOKENIZER_CONFIG))

    @staticmethod
    def special_tokens_of(config_file: Path) -> dict[str, str]:
        """bos_token, eos_token, ... of a tokenizer_config.json (empty when there is none)."""
        config = _read_json(config_file)
        return {key: text for key, value in config.items()
                if key.endswith("_token") and (text := _token_text(value)) is not None}

    def render(
        self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None, **kwargs
    ) -> str:
        """The conversation as text. kwargs are the template's own switches (enable_thinking, ...). A template that
        raises or fails on these messages is a UserError."""
        variables = self.special_tokens | kwargs
        try:
            return self._compiled.render(
                messages=[_normalized(m) for m in messages], tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, **variables,
            )
        except Exception as err:  # jinja errors, and a template's own raise_exception
            raise UserError(f"the chat template of {self.origin} fails on this conversation: "
                            f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from None


def _normalized(message: dict) -> dict:
    """What transformers hands a template: None-valued keys dropped, reasoning under each of its names."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body (transformers tracks it for masks; n3 derives
        masks by rendering prefixes, so any template works)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Not jinja's own filter, which escapes HTML characters
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
