from __future__ import annotations

import json
from dataclasses import asdict, replace

from fedmilm.metrics import (
    ClientEval,
    RoundRecord,
    append_record,
    format_progress,
    mean_or_none,
    plot_clients,
    plot_losses,
    read_records,
)
from fedmilm.metrics.per_phone import (
    PER_PHONE_FILE,
    append_per_phone,
    keep_rounds_up_to,
    read_per_phone,
)

REQUIRED = {"round", "loss_base", "loss_global", "loss_personal", "epsilon_user",
            "epsilon_sample_max", "delta", "bytes_up", "clients"}


def _record(r: int) -> RoundRecord:
    evals = [ClientEval(device=n, loss_base=3.0, loss_global=2.5 - 0.1 * r, loss_personal=None)
             for n in (1, 2)]
    return RoundRecord(round=r, clients=2, sampled=2, rejected=0, declined=0, train_loss=2.0,
                       loss_base=3.0, loss_global=2.5 - 0.1 * r, loss_personal=None,
                       bytes_up=100, bytes_down=100, seconds=1.0, tokens_per_s=50.0,
                       evaluated=len(evals))


def test_jsonl_has_the_design_keys_and_round_trips(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for r in (1, 2):
        append_record(path, _record(r))
    rows = read_records(path)
    assert [row["round"] for row in rows] == [1, 2]
    assert REQUIRED <= set(rows[0])
    assert rows[0]["epsilon_user"] is None and rows[1]["evaluated"] == 2


def test_mean_ignores_missing_values():
    assert mean_or_none([1.0, None, 3.0]) == 2.0
    assert mean_or_none([None]) is None


def test_progress_line_and_plots(tmp_path):
    line = format_progress(_record(1), 5)
    assert "round   1/5" in line and "personal   -" in line
    path = tmp_path / "metrics.jsonl"
    append_record(path, _record(1))
    rows = read_records(path)
    few = [asdict(_eval(n)) for n in range(3)]
    many = [asdict(_eval(n)) for n in range(500)]  # sorted curves instead of 500 bars
    for png in (plot_losses(rows, tmp_path / "a.png"), plot_clients(few, 1, tmp_path / "b.png"),
                plot_clients(many, 1, tmp_path / "c.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _eval(device: int, round_: int = 1) -> ClientEval:
    return ClientEval(device=device, loss_base=3.0, loss_global=2.0 + device / 1000 + round_,
                      loss_personal=1.5)


def test_per_phone_rows_live_in_their_own_compressed_file(tmp_path):
    """metrics.jsonl stays small at any cohort: 1,000 evaluated phones add one count to it,
    and their rows go to per_phone.jsonl.gz, readable back and cut on resume."""
    path, metrics = tmp_path / PER_PHONE_FILE, tmp_path / "metrics.jsonl"
    for r in (1, 2, 3):
        evals = [_eval(n, r) for n in range(1000)]
        append_per_phone(path, r, evals)
        append_record(metrics, replace(_record(r), evaluated=len(evals)))
    assert metrics.stat().st_size < 3 * 1000  # under a kilobyte a round
    rows = read_per_phone(path)
    assert sorted(rows) == [1, 2, 3] and len(rows[2]) == 1000
    assert rows[3][7] == asdict(_eval(7, 3))
    assert path.stat().st_size < len(json.dumps(rows)) / 3  # compressed
    keep_rounds_up_to(path, 2)
    assert sorted(read_per_phone(path)) == [1, 2]


def test_a_torn_last_round_of_per_phone_rows_is_dropped(tmp_path):
    path = tmp_path / PER_PHONE_FILE
    append_per_phone(path, 1, [_eval(0)])
    append_per_phone(path, 2, [_eval(0)])
    data = path.read_bytes()
    path.write_bytes(data[:-9])  # a crash in the middle of the second append
    assert sorted(read_per_phone(path)) == [1]
