"""Where documents come from: text files, folders of them, jsonl files, and the built-in corpus.

A source is named (its blend weight and quality mark refer to the name) and yields documents as strings. The built-in
corpus is what every Python installation ships: the standard library's own source code (`python-code`) and its
documentation (`python-docs`: the language and library reference topics behind `help()`, and IDLE's text files).
"""

from __future__ import annotations

import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import UserError

BUILTIN = "builtin"
"""The source argument that names the built-in corpus."""
BUILTIN_NAMES = ("python-code", "python-docs")
LEFT_OUT = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings", "pydoc_data"}
"""Folders of the standard library left out of python-code: test suites (fixtures, not code people write), installed
packages, the generated character-map tables of `encodings`, and pydoc's topics (prose: they are python-docs)."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Source:
    name: str
    origin: str
    kind: str
    """text: one document per file; jsonl: one per line, from `json_field`; docs: text files, and pydoc's topics file
    read as one document per topic."""
    files: list[Path]
    json_field: str = "text"
    quality: bool = False
    weight: float = 1.0
    stats: dict = field(default_factory=dict)
    """Counts of files skipped while reading (binary, not UTF-8)."""

    def fingerprint(self) -> list:
        """What the documents depend on: each file's path, size and modification time."""
        return [self.name, self.kind, self.json_field] + [[str(f), *_stat(f)] for f in self.files]

    def documents(self) -> Iterator[str]:
        for file in self.files:
            if self.kind == "jsonl":
                yield from _jsonl_documents(file, self.json_field)
            elif self.kind == "docs" and file.suffix == ".py":
                yield from _topics(file)
            else:
                text = _read_text(file)
                if text is None:
                    self.stats["skipped"] = self.stats.get("skipped", 0) + 1
                else:
                    yield text


def _stat(file: Path) -> tuple[int, int]:
    st = file.stat()
    return st.st_size, st.st_mtime_ns


def parse_sources(args: list[str], field_name: str = "text") -> list[Source]:
    """Sources from command-line arguments `[NAME=]PATH` (or `builtin`); the name defaults to the file or folder
    name. Raises UserError for a missing path, an empty folder or a name given twice."""
    sources: list[Source] = []
    for arg in args or [BUILTIN]:
        name, eq, path = arg.partition("=")
        if not eq:
            name, path = "", arg
        if path == BUILTIN:
            if name:
                raise UserError(f"{arg!r}: the built-in corpus keeps its own source names ({', '.join(BUILTIN_NAMES)})")
            sources += builtin_sources()
        else:
            sources.append(_path_source(name, Path(path).expanduser(), field_name))
    seen: set[str] = set()
    for source in sources:
        if not NAME.match(source.name):
            raise UserError(f"source name {source.name!r}: use letters, digits, '.', '_' and '-'")
        if source.name in seen:
            raise UserError(f"two sources are named {source.name!r}; name them with NAME=PATH")
        seen.add(source.name)
    return sources


def _path_source(name: str, path: Path, field_name: str) -> Source:
    if not path.exists():
        raise UserError(f"source {path} does not exist")
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(f"source folder {path} holds no files")
    jsonl = [f.suffix == ".jsonl" for f in files]
    if any(jsonl) and not all(jsonl):
        raise UserError(f"source folder {path} mixes .jsonl and other files; give them as separate sources")
    name = name or (path.stem if path.is_file() else path.resolve().name)
    return Source(name, str(path), "jsonl" if all(jsonl) else "text", files, json_field=field_name)


def stdlib_code() -> tuple[Path, list[Path]]:
    """The standard library's folder and its .py files (test suites and the other LEFT_OUT folders left out)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return stdlib, sorted(p for p in stdlib.rglob("*.py") if not LEFT_OUT.intersection(p.relative_to(stdlib).parts[:-1]))


def stdlib_packages() -> dict[str, list[Path]]:
    """Each top-level package of the standard library (a folder with an __init__.py) and its .py files, in path
    order: repository-level documents."""
    stdlib, code = stdlib_code()
    packages: dict[str, list[Path]] = {}
    for path in code:
        parts = path.relative_to(stdlib).parts
        if len(parts) > 1 and (stdlib / parts[0] / "__init__.py").is_file():
            packages.setdefault(parts[0], []).append(path)
    return packages


def builtin_sources() -> list[Source]:
    """The standard library's code and documentation, as shipped with this interpreter."""
    stdlib, code = stdlib_code()
    if not code:
        raise UserError(f"the built-in corpus needs the standard library's .py files, and {stdlib} has none")
    # The docs are prose: marked quality, so the second curriculum phase favours them.
    sources = [Source("python-code", f"Python {_version()} standard library source ({stdlib})", "text", code)]
    topics = stdlib / "pydoc_data" / "topics.py"
    docs = [topics] if topics.is_file() else []
    docs += sorted((stdlib / "idlelib").glob("*.txt"))
    if docs:
        origin = f"Python {_version()} documentation shipped with the interpreter (pydoc topics, IDLE texts)"
        sources.append(Source("python-docs", origin, "docs", docs, quality=True))
    return sources


def _version() -> str:
    return sysconfig.get_python_version()


def _read_text(file: Path) -> str | None:
    """The file as UTF-8 text, or None for binary or undecodable files."""
    data = file.read_bytes()
    if b"\0" in data[:4096]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_documents(file: Path, field_name: str) -> Iterator[str]:
    with file.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{file}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or field_name not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{file}:{number}: no field {field_name!r} (has {keys}); choose one with --field")
            value = record[field_name]
            if not isinstance(value, str):
                raise UserError(f"{file}:{number}: field {field_name!r} is {type(value).__name__}, not text")
            yield value


def _topics(file: Path) -> Iterator[str]:
    """pydoc's topics file is one dict literal: topic -> reference text. Read it without importing it."""
    import ast

    tree = ast.parse(file.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            yield from ast.literal_eval(node.value).values()
