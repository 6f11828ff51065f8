"""The phone protocol's JSON schemas (clients/android/schemas/) agree with the Python side:
what Python writes validates, and what Python refuses the schema refuses too."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from fedmilm.export.job import JobResult, TrainJob

SCHEMAS = Path(__file__).resolve().parents[3] / "clients" / "android" / "schemas"


def schema(name: str) -> jsonschema.Draft202012Validator:
    loaded = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(loaded)
    return jsonschema.Draft202012Validator(loaded)


GOOD_JOBS = [
    TrainJob(epochs=1, batch_size=8, sampling="shuffle", noise_multiplier=None,
             max_grad_norm=None),
    TrainJob(epochs=100, batch_size=4096, sampling="poisson", noise_multiplier=1.1,
             max_grad_norm=0.5),
    TrainJob(epochs=2, batch_size=1, sampling="poisson", noise_multiplier=0.8,
             max_grad_norm=1.0, seed=7),
]
SHUFFLE = json.loads(GOOD_JOBS[0].to_json())
BAD_JOBS = {
    "version 2": {"version": 2},
    "0 epochs": {"epochs": 0},
    "10^9 epochs": {"epochs": 10**9},
    "batch 4097": {"batch_size": 4097},
    "epochs as text": {"epochs": "3"},
    "epochs as a fraction": {"epochs": 2.5},
    "unknown sampling": {"sampling": "random"},
    "noise without poisson": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
    "poisson without noise": {"sampling": "poisson"},
    "zero noise": {"sampling": "poisson", "noise_multiplier": 0.0, "max_grad_norm": 1.0},
    "negative clip": {"sampling": "poisson", "noise_multiplier": 1.0, "max_grad_norm": -1.0},
    "an unknown field": {"priority": 1},
}


@pytest.mark.parametrize("job", GOOD_JOBS, ids=lambda j: j.sampling)
def test_every_job_python_writes_validates(job):
    schema("job").validate(json.loads(job.to_json()))


@pytest.mark.parametrize("name", sorted(BAD_JOBS))
def test_a_job_python_refuses_the_schema_refuses(name):
    raw = {**SHUFFLE, **BAD_JOBS[name]}
    with pytest.raises(ValueError):
        TrainJob.from_json(json.dumps(raw))
    assert refused_by("job", json.dumps(raw)), name


BAD_RESULTS = {
    "negative steps": {"steps": -1},
    "steps as a fraction": {"steps": 1.5},
    "nan loss": {"loss": float("nan")},
    "negative seconds": {"seconds": -0.1},
    "a missing field": {"tokens": None},
    "an extra field": {"per_example_losses": [0.1, 0.2]},
}
GOOD_RESULT = JobResult(steps=4, examples=32, tokens=4096, loss=2.31, seconds=12.5)


def test_a_result_python_writes_validates():
    schema("result").validate(json.loads(GOOD_RESULT.to_json()))
    assert JobResult.from_json(GOOD_RESULT.to_json()) == GOOD_RESULT


@pytest.mark.parametrize("name", sorted(BAD_RESULTS))
def test_a_result_python_refuses_the_schema_refuses(name):
    raw = {**json.loads(GOOD_RESULT.to_json()), **BAD_RESULTS[name]}
    raw = {k: v for k, v in raw.items() if v is not None}
    text = json.dumps(raw)
    with pytest.raises(ValueError, match="invalid result"):
        JobResult.from_json(text)
    assert refused_by("result", text), name


def refused_by(name: str, text: str) -> bool:
    """Whether a phone or bridge reading `text` as strict JSON (no NaN or Infinity, which JSON
    does not have) against the schema refuses it."""
    def no_constants(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        raw = json.loads(text, parse_constant=no_constants)
    except ValueError:
        return True
    return bool(list(schema(name).iter_errors(raw)))
