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


MAX_LINE_BYTES = 1 << 20  # one conversation; a longer line is refused before it is parsed


def read_user_file(path: Path) -> list[Conversation]:
    """All conversations of one user; blank lines are skipped. Any malformed line (bad JSON or
    UTF-8, wrong shape, over MAX_LINE_BYTES) is a `DataFormatError` naming `file:line`."""
    conversations = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""),
                                     start=1):
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataFormatError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{where}: not UTF-8 (byte {err.start})") from err
            if line.strip():
                conversations.append(_parse_line(line, where))
    return conversations


def user_files(folder: str | Path) -> list[Path]:
    """The per-user files in a stable order: phone i reads the i-th file."""
    found = sorted(Path(folder).expanduser().glob("*.jsonl"))
    for path in found:
        if not path.is_file():
            raise DataFormatError(f"{path}: not a file (one <user>.jsonl file per phone)")
    if not found:
        raise DataFormatError(f"{folder}: no *.jsonl files (one file per user expected)")
    return found
