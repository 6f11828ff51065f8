"""One round's training through Flower's SecAgg+ (legacy workflow API), so the server only ever
sees the mean of the phones' updates.

Flower 1.42 offers SecAgg+ only as `SecAggPlusWorkflow` over a `LegacyContext` and a legacy
`Strategy`. This module adapts it to our round loop: a one-round strategy that sends our
FitIns to our cohort and captures the unmasked mean. No cryptography of our own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedmilm.adapters import State
from fedmilm.adapters.packing import from_ndarrays, to_ndarrays
from fedmilm.config.schema import AggregationConfig
from fedmilm.privacy.secagg_grid import SECAGG_MODULUS

log = logging.getLogger("fedmilm.server")


class _OneRound(LegacyFedAvg):
    """Sends one FitIns to a fixed cohort and keeps the unmasked mean SecAgg+ hands back."""

    def __init__(self, grid: Grid, cohort: list[int], fitins: FitIns) -> None:
        super().__init__(min_fit_clients=1, min_evaluate_clients=1, min_available_clients=1)
        self.grid, self.cohort, self.fitins = grid, cohort, fitins
        self.mean: list[np.ndarray] | None = None
        self.count = 0

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001
        return [(GridClientProxy(node, self.grid, 0), self.fitins) for node in self.cohort]

    def aggregate_fit(self, server_round, results: list[tuple[object, FitRes]], failures):
        self.count = len(results)
        if results:  # every result carries the same aggregate: SecAgg+ set it so
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _FlooredSecAggPlus(SecAggPlusWorkflow):
    """SecAgg+ that never unmasks a sum of fewer than `floor` masked vectors: with distributed
    noise each vector carries one share, and the server's accountant charged `floor` shares."""

    def __init__(self, *, floor: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.floor = floor

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:  # noqa: ANN001
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        if len(state.active_node_ids) < self.floor:
            log.warning("SecAgg+: %d masked vectors arrived, fewer than the %d shares of noise "
                        "the server's accountant charged (federation.min_replies); not unmasked",
                        len(state.active_node_ids), self.floor)
            return False
        return True


@dataclass(frozen=True)
class SecureRound:
    """What the server learns from a SecAgg+ round: the mean, and how many phones made it."""

    mean: State | None
    count: int


def secure_mean(grid: Grid, cohort: list[int], *, global_state: State, config: ConfigRecord,
                server_round: int, agg: AggregationConfig, timeout: float,
                floor: int = 0) -> SecureRound:
    """Run SecAgg+ over `cohort`; phones train inside its masked-vector stage. `floor`: the
    fewest masked vectors the server unmasks (distributed noise), else none is withheld."""
    shares = min(agg.secagg_shares, len(cohort))
    if len(cohort) < 3 or agg.secagg_threshold >= shares:
        log.warning("round %d: %d phones sampled, too few for SecAgg+ (threshold %d); skipped",
                    server_round, len(cohort), agg.secagg_threshold)
        return SecureRound(None, 0)
    if len(cohort) * agg.secagg_quant_range >= SECAGG_MODULUS:
        log.warning("round %d: %d phones x aggregation.secagg_quant_range would overflow "
                    "SecAgg+'s 2^32 modulus; skipped", server_round, len(cohort))
        return SecureRound(None, 0)
    fitins = FitIns(ndarrays_to_parameters(to_ndarrays(global_state)), dict(config))
    strategy = _OneRound(grid, cohort, fitins)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        {k: v.to(torch.float32) for k, v in global_state.items()})
    workflow = _FlooredSecAggPlus(floor=floor, num_shares=shares,
                                  reconstruction_threshold=agg.secagg_threshold,
                                  max_weight=1.0,  # phones send weight 1: a uniform mean
                                  clipping_range=agg.secagg_clip_range,
                                  quantization_range=agg.secagg_quant_range, timeout=timeout)
    workflow(grid, context)
    if strategy.mean is None:
        return SecureRound(None, strategy.count)
    return SecureRound(from_ndarrays(strategy.mean, global_state), strategy.count)
