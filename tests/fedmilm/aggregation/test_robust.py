"""The Byzantine-robust rules, each against a few honest updates and one liar."""

from __future__ import annotations

import pytest
import torch

from fedmilm.aggregation.robust import robust_mean

HONEST = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])},
          {"w": torch.tensor([1.2, 2.2]), "b": torch.tensor([0.7])},
          {"w": torch.tensor([0.8, 1.8]), "b": torch.tensor([0.3])},
          {"w": torch.tensor([1.1, 2.1]), "b": torch.tensor([0.6])}]
LIAR = {"w": torch.tensor([1000.0, -1000.0]), "b": torch.tensor([1e6])}


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    out = robust_mean([*HONEST, LIAR], method="trimmed_mean", trim_fraction=0.2)
    # per coordinate: drop the largest and smallest of five, average the middle three
    torch.testing.assert_close(out["w"], torch.tensor([(1.0 + 1.1 + 1.2) / 3,
                                                       (1.8 + 2.0 + 2.1) / 3]))
    torch.testing.assert_close(out["b"], torch.tensor([0.6]))


def test_median_is_coordinate_wise():
    out = robust_mean([*HONEST, LIAR], method="median")
    torch.testing.assert_close(out["w"], torch.tensor([1.1, 2.0]))
    torch.testing.assert_close(out["b"], torch.tensor([0.6]))


def test_krum_picks_one_honest_update_whole():
    out = robust_mean([*HONEST, LIAR], method="krum", byzantine=1)
    assert any(all(torch.equal(out[k], h[k]) for k in h) for h in HONEST)


def test_the_mean_would_have_been_dragged_away():
    """Why the rules exist: the same liar moves a plain mean by hundreds."""
    mean = torch.stack([u["w"] for u in [*HONEST, LIAR]]).mean(0)
    assert float(mean.abs().max()) > 100


def test_results_are_float32_with_the_input_keys_and_shapes():
    half = [{k: v.half() for k, v in u.items()} for u in HONEST]
    out = robust_mean(half, method="median")
    assert set(out) == {"w", "b"} and out["w"].dtype == torch.float32
    assert out["w"].shape == (2,) and out["b"].shape == (1,)


def test_nothing_or_an_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="nothing"):
        robust_mean([], method="median")
    with pytest.raises(ValueError, match="unknown"):
        robust_mean(HONEST, method="mean-ish")
