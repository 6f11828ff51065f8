"""A fleet, not a handful: 2,000 virtual phones in the real simulation engine, in CI time.
Data and storage exist only for phones that were sampled, metrics stay small, the console
holds only fedmilm's own lines, and a round reports its progress while it runs."""

from __future__ import annotations

import json

import pytest

from fedmilm.cli.common import load_or_exit
from fedmilm.metrics.per_phone import PER_PHONE_FILE, read_per_phone
from tests.conftest import compose_config
from tests.fedmilm.cli.test_simulate import _simulate

PHONES, COHORT, EVAL, ROUNDS = 2000, 12, 6, 2
LIBRARY_NOISE = ("Failed to load", "_pytree", "DEPRECATED", "Enum subclass")


@pytest.mark.e2e
def test_a_2000_phone_federation_touches_only_the_phones_it_samples(tmp_path):
    run_dir = tmp_path / "run"
    done = _simulate(["model=tiny", f"federation.num_clients={PHONES}",
                      f"federation.clients_per_round={COHORT}",
                      f"federation.clients_per_eval={EVAL}", f"federation.rounds={ROUNDS}",
                      "train.epochs=1", "federation.progress_every_s=0.5",
                      f"hydra.run.dir={run_dir}"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows] == [COHORT] * ROUNDS
    assert [r["evaluated"] for r in rows] == [EVAL] * ROUNDS
    assert max(len(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()) < 1500
    per_phone = read_per_phone(run_dir / PER_PHONE_FILE)
    assert sorted(per_phone) == [1, 2] and all(len(p) == EVAL for p in per_phone.values())
    stored = [p for p in (run_dir / "devices").iterdir() if p.is_dir()]
    assert 0 < len(stored) <= COHORT * ROUNDS  # storage only for phones that trained
    console = done.stdout + done.stderr
    assert not [n for n in LIBRARY_NOISE if n in console], console[-3000:]
    assert "phones |" in console and "ETA" in console  # progress inside the round


def test_starting_a_10000_phone_simulation_generates_no_phone_data(monkeypatch):
    """Synthetic data is generated per phone when that phone first trains or evaluates."""
    from fedmilm.data import synthetic

    made = []
    original = synthetic.make_persona
    monkeypatch.setattr(synthetic, "make_persona", lambda *a, **k: made.append(1) or
                        original(*a, **k))
    cfg = load_or_exit(compose_config(["model=tiny", "federation.num_clients=10000",
                                       "federation.clients_per_round=1000"]))
    assert cfg.federation.num_clients == 10000 and made == []
