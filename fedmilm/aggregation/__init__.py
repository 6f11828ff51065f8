"""Server-side maths on adapter updates: validation and averaging."""

from fedmilm.aggregation.fedavg import apply_update, weighted_mean
from fedmilm.aggregation.validate import update_problem

__all__ = ["apply_update", "update_problem", "weighted_mean"]
