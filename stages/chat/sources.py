"""Where conversations come from: jsonl, json, parquet, Hugging Face `datasets` folders, folders of such files, and
the built-in verifiable tasks (stages/envs).

    sources = parse_chat_sources(["mine=chats.jsonl", "hub_dump/"], {"mine": 2.0})
    conversations, skipped = read_source(sources[0], skip_bad=False)

A bad row is a UserError naming the file and the line (or row) and what is wrong with it; with skip_bad it is
skipped and counted instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError
from stages.chat.rows import Conversation, RowError, parse_row

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FILES = (".jsonl", ".json", ".parquet")


@dataclass
class ChatSource:
    name: str
    path: Path
    weight: float = 1.0
    """Taken this many times over in the training mix (2: twice, 0.5: half)."""


def parse_chat_sources(args: list[str], weights: dict[str, float] | None = None) -> list[ChatSource]:
    """Sources from `[NAME=]PATH` arguments (NAME defaults to the file or folder name) and NAME -> weight."""
    sources = []
    for arg in args:
        name, eq, path = arg.partition("=")
        if not eq:
            name, path = "", arg
        path = Path(path).expanduser()
        if not path.exists():
            raise UserError(f"chat data {path} does not exist")
        name = name or (path.stem if path.is_file() else path.resolve().name)
        if not NAME.match(name):
            raise UserError(f"chat data name {name!r}: use letters, digits, '.', '_' and '-'")
        if any(s.name == name for s in sources):
            raise UserError(f"two chat data sources are named {name!r}; name them with NAME=PATH")
        sources.append(ChatSource(name, path))
    for name, weight in (weights or {}).items():
        source = next((s for s in sources if s.name == name), None)
        if source is None:
            raise UserError(f"--weight {name}: no chat data source is named {name!r} "
                            f"({', '.join(s.name for s in sources) or 'none given'})")
        if weight <= 0:
            raise UserError(f"--weight {name}={weight}: weights must be positive")
        source.weight = weight
    return sources


def read_source(source: ChatSource, skip_bad: bool = False) -> tuple[list[Conversation], int]:
    """The source's conversations, and how many bad rows were skipped (always 0 without skip_bad)."""
    conversations, skipped = [], 0
    for origin, row in _rows(source.path):
        try:
            conversation = parse_row(row, origin)
        except RowError as err:
            if not skip_bad:
                raise UserError(f"{origin}: {err} (--skip-bad skips such rows)") from None
            skipped += 1
            continue
        conversation.meta["source"] = source.name
        conversations.append(conversation)
    if not conversations:
        raise UserError(f"chat data {source.path} holds no conversation" + (f" ({skipped} bad rows)" if skipped else ""))
    return conversations, skipped


def held_out(conversation: Conversation, fraction: float) -> bool:
    """Whether a conversation belongs to the validation share: by a hash of its first user turn, so a rerun holds out
    the same ones and no prompt is on both sides."""
    digest = hashlib.sha256(conversation.prompt_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) for every row under a path."""
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _datasets_rows(path)
            return
        files = sorted(p for p in path.rglob("*") if p.suffix in FILES and p.is_file())
        if not files:
            raise UserError(f"chat data folder {path} holds no {', '.join(FILES)} files (nor a datasets folder)")
        for file in files:
            yield from file_rows(file)
    else:
        yield from file_rows(path)


def file_rows(file: Path) -> Iterator[tuple[str, object]]:
    """The rows of one .jsonl, .json or .parquet file, each with where it is ("FILE:LINE" or "FILE row N")."""
    if file.suffix == ".parquet":
        yield from _parquet_rows(file)
    elif file.suffix == ".json":
        try:
            rows = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise UserError(f"{file}: a .json chat file holds a list of rows; use .jsonl for one row per line")
        yield from ((f"{file} row {i}", row) for i, row in enumerate(rows))
    elif file.suffix == ".jsonl":
        with file.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{file}:{number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UserError(f"{file}:{number}: not valid JSON ({err.msg})") from None
    else:
        raise UserError(f"chat data {file}: read {', '.join(FILES)} files or a datasets folder")


def _parquet_rows(file: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install 'n3[sft]'") from None
    try:
        table = pq.read_table(file)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError subclasses for damaged files
        raise UserError(f"cannot read {file}: {' '.join(str(err).split())}") from None
    yield from ((f"{file} row {i}", row) for i, row in enumerate(table.to_pylist()))


def _datasets_rows(path: Path) -> Iterator[tuple[str, object]]:
    """A folder `datasets` wrote with save_to_disk: one dataset, or a DatasetDict whose train split is read."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading a datasets folder needs the datasets package: pip install 'n3[sft]'") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError, arrow errors: a damaged folder
        raise UserError(f"cannot read the datasets folder {path}: {' '.join(str(err).split())}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise UserError(f"{path} is a DatasetDict without a train split (it has {', '.join(data)})")
        data, path = data["train"], path / "train"
    yield from ((f"{path} row {i}", row) for i, row in enumerate(data))
