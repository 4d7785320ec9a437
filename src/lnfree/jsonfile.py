"""Reading and writing lnfree's JSON files (run.json, state.json, config.json, metrics.jsonl). Writes are atomic; a
damaged file is one line that names the file and the line, never a bare "Expecting property name" from `json`.

metrics.jsonl is appended one line per step; a kill can leave its last line half written. That line belongs to a
step no checkpoint holds, so readers drop it (`read_jsonl`) and a resume rewrites the file without it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `path` whole or not at all: a temp file beside it, synced, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _damaged(path: Path, e: json.JSONDecodeError, line: int | None = None) -> ValueError:
    where = f"line {line if line is not None else e.lineno}"
    return ValueError(f"{path}: damaged JSON at {where} ({e.msg}); restore the file or start from a fresh folder")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _damaged(path, e) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file; restore it or start from a fresh folder") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSON-lines file; a last line cut short by a kill (no newline after it) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # the last line, without its newline: a write interrupted by a kill
                break
            raise _damaged(path, e, number) from None
    return records
