from __future__ import annotations

import pytest
import torch

from fedmilm.aggregation import apply_update, update_problem, weighted_mean

REF = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


def test_weighted_mean_matches_closed_form():
    u1 = {"a": torch.ones(2, 3), "b": torch.full((4,), 2.0)}
    u2 = {"a": torch.full((2, 3), 4.0), "b": torch.zeros(4)}
    mean = weighted_mean([u1, u2], [1, 3])
    assert torch.allclose(mean["a"], torch.full((2, 3), (1 * 1 + 3 * 4) / 4))
    assert torch.allclose(mean["b"], torch.full((4,), (1 * 2 + 3 * 0) / 4))
    assert torch.equal(apply_update(REF, mean)["a"], mean["a"])


def test_weighted_mean_refuses_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([REF], [0])
    with pytest.raises(ValueError):
        weighted_mean([], [])


@pytest.mark.parametrize("update,needle", [
    ({"a": torch.zeros(2, 3)}, "missing"),
    ({**REF, "c": torch.zeros(1)}, "unexpected"),
    ({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, "shape"),
    ({"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(4)}, "dtype"),
    ({"a": torch.full((2, 3), float("nan")), "b": torch.zeros(4)}, "NaN"),
    ({"a": torch.full((2, 3), float("inf")), "b": torch.zeros(4)}, "NaN or inf"),
    ({"a": torch.full((2, 3), 100.0), "b": torch.zeros(4)}, "norm"),
])
def test_bad_updates_are_rejected_with_a_reason(update, needle):
    assert needle in update_problem(update, REF, max_norm=10.0)


def test_good_update_passes_including_float16():
    good = {"a": torch.ones(2, 3, dtype=torch.float16), "b": torch.ones(4)}
    assert update_problem(good, REF, max_norm=10.0) is None
