"""Server-side maths on adapter updates: validation, averaging, cohort and DP strategies."""

from fedmilm.aggregation.dp_fedavg import DpFedAvg
from fedmilm.aggregation.dp_ftrl import DpFtrl
from fedmilm.aggregation.fedavg import apply_update, weighted_mean
from fedmilm.aggregation.strategies import Aggregator, FedAvg, aggregate_all, create_aggregator
from fedmilm.aggregation.validate import update_problem

__all__ = ["Aggregator", "DpFedAvg", "DpFtrl", "FedAvg", "aggregate_all", "apply_update",
           "create_aggregator", "update_problem", "weighted_mean"]
