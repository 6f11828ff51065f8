"""Real interactions from disk: one `<user>.jsonl` per phone, one conversation per line."""

from __future__ import annotations

import json
from pathlib import Path

from fedmilm.data.synthetic import Conversation

ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """A data file line is malformed; the message names the file and line number."""


def _parse_line(text: str, where: str) -> Conversation:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{where}: not valid JSON ({err.msg})") from err
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: expected an object with a non-empty \"messages\" list")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise DataFormatError(f"{where}: messages[{i}] needs \"role\" in {list(ROLES)} and a "
                                  "string \"content\"")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: no assistant message, nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_user_file(path: Path) -> list[Conversation]:
    """All conversations of one user; blank lines are skipped."""
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                conversations.append(_parse_line(line, f"{path}:{number}"))
    return conversations


def user_files(folder: str | Path) -> list[Path]:
    """The per-user files in a stable order: phone i reads the i-th file."""
    files = sorted(Path(folder).expanduser().glob("*.jsonl"))
    if not files:
        raise DataFormatError(f"{folder}: no *.jsonl files (one file per user expected)")
    return files
