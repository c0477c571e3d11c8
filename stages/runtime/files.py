"""Writing result files whole: through a temporary name and a rename, so a reader (or a killed run) never leaves
half a file. The one writer every stage's reports, manifests and summaries go through."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path: Path, text: str) -> Path:
    """Write text to path atomically; the parent folder is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(path: Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))
