from __future__ import annotations

import subprocess
import sys

from fedmilm.cli.privacy_plot import collect
from fedmilm.metrics import RoundRecord, append_record


def _run(folder, eps_user, loss):
    folder.mkdir(parents=True)
    for r in (1, 2):
        append_record(folder / "metrics.jsonl", RoundRecord(
            round=r, clients=3, sampled=3, rejected=0, declined=0, train_loss=1.0,
            loss_base=3.0, loss_global=loss + (2 - r), loss_personal=None, bytes_up=1,
            bytes_down=1, seconds=1.0, tokens_per_s=1.0, epsilon_user=eps_user * r / 2,
            delta=1e-5, accountant="prv"))


def test_collects_the_last_round_of_every_run_in_a_sweep(tmp_path):
    for i, (eps, loss) in enumerate([(1.0, 2.5), (4.0, 1.5), (16.0, 1.0)]):
        _run(tmp_path / "sweep" / str(i), eps, loss)
    points = collect([tmp_path / "sweep"])
    assert [(p["epsilon_user"], p["loss_global"]) for p in points] == [(1.0, 2.5), (4.0, 1.5),
                                                                        (16.0, 1.0)]
    out = tmp_path / "tradeoff.png"
    done = subprocess.run([sys.executable, "-c",
                           "from fedmilm.cli.privacy_plot import main; main()",
                           str(tmp_path / "sweep"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x89PNG" and "eps_user=16.0" in done.stdout


def test_refuses_folders_without_dp_runs(tmp_path):
    done = subprocess.run([sys.executable, "-c",
                           "from fedmilm.cli.privacy_plot import main; main()", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no run with a DP epsilon" in done.stderr
