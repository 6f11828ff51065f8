from __future__ import annotations

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

REQUIRED = {"round", "loss_base", "loss_global", "loss_personal", "epsilon_user",
            "epsilon_sample_max", "delta", "bytes_up", "clients"}


def _record(r: int) -> RoundRecord:
    evals = [ClientEval(device=n, loss_base=3.0, loss_global=2.5 - 0.1 * r, loss_personal=None)
             for n in (1, 2)]
    return RoundRecord(round=r, clients=2, sampled=2, rejected=0, declined=0, train_loss=2.0,
                       loss_base=3.0, loss_global=2.5 - 0.1 * r, loss_personal=None,
                       bytes_up=100, bytes_down=100, seconds=1.0, tokens_per_s=50.0,
                       per_client=evals)


def test_jsonl_has_the_design_keys_and_round_trips(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for r in (1, 2):
        append_record(path, _record(r))
    rows = read_records(path)
    assert [row["round"] for row in rows] == [1, 2]
    assert REQUIRED <= set(rows[0])
    assert rows[0]["epsilon_user"] is None and rows[1]["per_client"][0]["device"] == 1


def test_mean_ignores_missing_values():
    assert mean_or_none([1.0, None, 3.0]) == 2.0
    assert mean_or_none([None]) is None


def test_progress_line_and_plots(tmp_path):
    line = format_progress(_record(1), 5)
    assert "round   1/5" in line and "personal   -" in line
    path = tmp_path / "metrics.jsonl"
    append_record(path, _record(1))
    rows = read_records(path)
    for png in (plot_losses(rows, tmp_path / "a.png"), plot_clients(rows[0], tmp_path / "b.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
