"""Chat rows in OpenAI form, checked and brought to the form chat templates read.

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...], "tools": [...]}

- `content` is a string or a list of text parts ({"type": "text", "text": ...}); an assistant turn with tool calls may
  leave it out. `developer` is read as `system`.
- assistant turns may carry `reasoning_content` (or `reasoning`), `tool_calls` ({"type": "function", "function":
  {"name", "arguments"}}, the arguments an object or, as OpenAI sends them, a JSON string), and
  `reasoning_truncated: true` for a trace cut by a thinking budget (its closing `</think>` was forced at inference, so
  it is not trained); tool turns may carry `tool_call_id` and `name`.

`n3 serve` checks request messages with the same rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ROLES = ("system", "developer", "user", "assistant", "tool")


class RowError(ValueError):
    """A malformed row: `where` is the JSON path of the bad value (e.g. "messages[2].role")."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    origin: str = ""
    """Where the row came from ("data.jsonl:12", "builtin math"), for messages about it."""
    meta: dict = field(default_factory=dict)
    """What else the row carries that training does not read (a built-in task's domain and level)."""

    @property
    def prompt_key(self) -> str:
        """The first user turn: two conversations with the same one never share a packed row."""
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")


def parse_row(row: object, origin: str = "") -> Conversation:
    """A Conversation from one row (RowError if it is malformed)."""
    if not isinstance(row, dict):
        raise RowError("row", f"must be an object with 'messages', got {type(row).__name__}")
    if "messages" not in row:
        raise RowError("row", f"has no 'messages' (it has {', '.join(map(str, row)) or 'nothing'})")
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RowError("tools", "must be a list of objects")
    return Conversation(parse_messages(row["messages"]), tools or None, origin)


def parse_messages(raw: object) -> list[dict]:
    """Checked, template-ready messages (RowError names the first bad value)."""
    if not isinstance(raw, list) or not raw:
        raise RowError("messages", "must be a non-empty list")
    return [parse_message(m, f"messages[{i}]") for i, m in enumerate(raw)]


def parse_message(message: object, where: str) -> dict:
    if not isinstance(message, dict):
        raise RowError(where, "must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise RowError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    role = "system" if role == "developer" else role
    out = {"role": role, "content": _content(message.get("content"), f"{where}.content",
                                             optional=role == "assistant" and bool(message.get("tool_calls")))}
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    allowed = {"assistant": ("reasoning_content", "tool_calls", "reasoning_truncated"),
               "tool": ("tool_call_id", "name")}.get(role, ())
    for key, value in (("reasoning_content", reasoning), ("tool_calls", message.get("tool_calls")),
                       ("reasoning_truncated", message.get("reasoning_truncated")),
                       ("tool_call_id", message.get("tool_call_id")), ("name", message.get("name"))):
        if value is None:
            continue
        if key not in allowed:
            raise RowError(f"{where}.{key}", f"is not allowed in a {role} message")
        if key == "tool_calls":
            if not isinstance(value, list):
                raise RowError(f"{where}.tool_calls", "must be a list")
            value = [_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(value)]
        elif key == "reasoning_truncated":
            if not isinstance(value, bool):
                raise RowError(f"{where}.{key}", "must be true or false")
        elif not isinstance(value, str):
            raise RowError(f"{where}.{key}", "must be a string")
        out[key] = value
    return out


def _content(content: object, where: str, optional: bool) -> str:
    if content is None:
        if optional:
            return ""
        raise RowError(where, "is missing")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RowError(where, "parts must be {'type': 'text', 'text': ...}")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RowError(where, "must be a string or a list of text parts")
    return content


def _tool_call(call: object, where: str) -> dict:
    """{"type": "function", "function": {"name", "arguments"}} with the arguments an object, as templates read them."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RowError(where, "must be {'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise RowError(f"{where}.function.arguments", "is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise RowError(f"{where}.function.arguments", "must be a JSON object")
    return {**call, "type": call.get("type", "function"), "function": {**function, "arguments": arguments}}
