"""Run metrics: per-round records, progress lines, plots."""

from fedmilm.metrics.plots import plot_clients, plot_losses, plot_privacy
from fedmilm.metrics.records import (
                                     DIAGNOSTICS_LABEL,
                                     ClientEval,
                                     RoundRecord,
                                     append_record,
                                     format_progress,
                                     interrupted_record,
                                     losses_by_rank,
                                     mean_or_none,
                                     read_records,
)

__all__ = ["DIAGNOSTICS_LABEL", "ClientEval", "RoundRecord", "append_record", "format_progress",
           "interrupted_record", "losses_by_rank", "mean_or_none",
           "plot_clients", "plot_losses", "plot_privacy", "read_records"]
