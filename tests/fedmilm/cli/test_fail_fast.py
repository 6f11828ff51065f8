"""Bad input stops the entry points before training: one line naming the key or `file:line`,
exit 2, nothing written into the run directory. In process (the subprocess path of the same
code is `test_simulate.py::test_invalid_config_stops_before_training`)."""

from __future__ import annotations

import json

import pytest
import torch

from fedmilm.cli.common import check_model, load_or_exit, prepare_run
from tests.conftest import compose_config

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def _users(folder, lines_of_user0: bytes | None = None) -> None:
    folder.mkdir()
    for user in range(2):
        (folder / f"u{user}.jsonl").write_text("\n".join(json.dumps(GOOD) for _ in range(4)))
    if lines_of_user0 is not None:
        (folder / "u0.jsonl").write_bytes(lines_of_user0)


def _one_line_exit(capsys, call) -> str:
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmilm: ")
    return lines[0]


GOOD_LINE = json.dumps(GOOD).encode()
BAD_FILES = {
    "bad json": (GOOD_LINE + b"\n{oops\n", "u0.jsonl:2: not valid JSON"),
    "wrong role": (GOOD_LINE + b'\n{"messages": [{"role": "bot", "content": "x"}]}\n',
                   "u0.jsonl:2: messages[0] needs"),
    "empty file": (b"", "user 0 has 0 conversation(s)"),
    "not utf-8": (GOOD_LINE + b"\n\xff\xfe\x00bad\n", "u0.jsonl:2: not UTF-8"),
    "20 MB line": (GOOD_LINE + b"\n" + b"x" * (20 << 20) + b"\n", "u0.jsonl:2: line longer"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_malformed_user_file_stops_with_its_file_and_line(tmp_path, capsys, case):
    content, needle = BAD_FILES[case]
    _users(tmp_path / "data", content)
    raw = compose_config(["model=tiny", "data=jsonl", f"data.path={tmp_path / 'data'}",
                          "federation.num_clients=2", "federation.clients_per_round=2"])
    assert needle in _one_line_exit(capsys, lambda: load_or_exit(raw))


def test_a_folder_named_like_a_user_file_is_refused(tmp_path, capsys):
    _users(tmp_path / "data")
    (tmp_path / "data" / "z.jsonl").mkdir()
    raw = compose_config(["model=tiny", "data=jsonl", f"data.path={tmp_path / 'data'}",
                          "federation.num_clients=2", "federation.clients_per_round=2"])
    assert "z.jsonl: not a file" in _one_line_exit(capsys, lambda: load_or_exit(raw))


@pytest.mark.parametrize("override,needle", [
    ("lora.r=-1", "lora.r=-1 is invalid"),
    ("federation.clients_per_round=99", "federation.clients_per_round=99 exceeds"),
    ("model=hf", "model.path"),
    ("client.runtime=tflite", "client.runtime='tflite' is not allowed"),
    ("train.device=tpu", "train.device='tpu' is not allowed"),
    ("federation.gpus_per_client=1.5", "federation.gpus_per_client=1.5 must be a fraction"),
    ("federation.max_in_flight=0", "federation.max_in_flight=0 is invalid"),
])
def test_an_invalid_value_is_one_line_naming_its_key(capsys, override, needle):
    raw = compose_config(["model=tiny", override])
    assert needle in _one_line_exit(capsys, lambda: load_or_exit(raw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_one_stops_at_start(capsys):
    raw = compose_config(["model=tiny", "train.device=cuda"])
    line = _one_line_exit(capsys, lambda: load_or_exit(raw))
    assert line.startswith("fedmilm: config error: train.device=cuda but this machine has no")


def test_auto_is_resolved_before_phones_see_the_config():
    cfg = load_or_exit(compose_config(["model=tiny"]))
    assert cfg.train.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_bad_interpolation_is_one_config_line(capsys):
    raw = compose_config(["model=tiny", "train.lr=${nowhere.key}"])
    line = _one_line_exit(capsys, lambda: load_or_exit(raw))
    assert "config error" in line and "nowhere" in line


def test_a_folder_that_is_not_a_hugging_face_model_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2]")
    raw = compose_config(["model=hf", f"model.path={tmp_path}"])
    assert "model.path" in _one_line_exit(capsys, lambda: load_or_exit(raw))


def test_a_malformed_availability_trace_names_its_line(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("device,slot,idle,charging,unmetered,battery_percent,temperature_c\n"
                     "0,0,1,1,1,eighty,30\n")
    raw = compose_config(["model=tiny", "device.availability=trace",
                          f"device.availability_path={trace}"])
    assert "trace.csv:2" in _one_line_exit(capsys, lambda: load_or_exit(raw))


def test_lora_targets_that_match_nothing_stop_before_anything_is_written(tmp_path, capsys):
    cfg = load_or_exit(compose_config(["model=tiny", "lora.target_modules=[no_such_proj]"]))
    line = _one_line_exit(capsys, lambda: prepare_run(cfg, tmp_path / "run"))
    assert "lora.target_modules" in line
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_budget_nothing_fits_is_one_line(capsys):
    cfg = load_or_exit(compose_config(["model=tiny", "client.memory_budget_mb=64"]))
    assert "client.memory_budget_mb=64" in _one_line_exit(capsys, lambda: check_model(cfg))


def test_a_run_whose_every_round_was_skipped_fails(tmp_path):
    from fedmilm.cli.common import RunFailed, report_run

    cfg = load_or_exit(compose_config(["model=tiny", "federation.rounds=2"]))
    rows = [{"round": r, "skipped": True, "loss_base": None, "loss_global": None,
             "loss_personal": None} for r in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunFailed, match="every one of the 2 rounds was skipped"):
        report_run(cfg, tmp_path, started=0.0)
    rows[1]["skipped"] = False
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report_run(cfg, tmp_path, started=0.0)  # one aggregated round is a run
