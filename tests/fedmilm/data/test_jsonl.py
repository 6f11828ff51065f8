from __future__ import annotations

import json

import pytest

from fedmilm.config.schema import DataConfig
from fedmilm.data import DataFormatError, count_users, load_user

CONV = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _cfg(path, **kw) -> DataConfig:
    base = dict(source="jsonl", path=str(path), train_per_user=100, heldout_per_user=100,
                heldout_fraction=0.25, zh_fraction=0.0, max_length=128, system_prompt=None,
                canary_users=0, canary_repeats=0)
    return DataConfig(**{**base, **kw})


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_reads_users_in_sorted_order_and_splits(tmp_path):
    for name, n in (("b", 8), ("a", 4)):
        convs = [{"messages": [{"role": "user", "content": f"{name}{i}"},
                               {"role": "assistant", "content": "ok"}]} for i in range(n)]
        _write(tmp_path / f"{name}.jsonl", [json.dumps(c) for c in convs])
    assert count_users(_cfg(tmp_path)) == 2
    first = load_user(_cfg(tmp_path), user=0, seed=0)  # a.jsonl
    assert first.train[0][0]["content"] == "a0"
    assert (len(first.train), len(first.heldout)) == (3, 1)
    assert first.heldout[0][0]["content"] == "a3"


@pytest.mark.parametrize("line,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"text": "hi"}), "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "messages[0]"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    _write(tmp_path / "u.jsonl", [json.dumps(CONV), "", line])
    with pytest.raises(DataFormatError) as err:
        load_user(_cfg(tmp_path), user=0, seed=0)
    assert "u.jsonl:3" in str(err.value) and needle in str(err.value)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataFormatError, match="no \\*.jsonl"):
        count_users(_cfg(tmp_path))
