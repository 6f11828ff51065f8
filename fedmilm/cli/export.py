"""`fedmilm-export`: the phone's ExecuTorch training programs for a run config.

    fedmilm-export client.runtime=executorch [the run's overrides]      into RUN_DIR/export
    fedmilm-export client.runtime=executorch client.export_dir=DIR privacy=sample
                                                          into DIR, with the DP-SGD program

Writes train.pte + adapter.ptd, adamw.pte, dp_grad.pte (sample-level DP), tokenizer/ and
manifest.json (see fedmilm/export/bundle.py). `fedmilm-simulate client.runtime=executorch
client.export_dir=DIR` (same overrides) then trains every phone through these files; a bundle
made for other settings is refused.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedmilm.cli.common import CONFIG_DIR, prepare_model, run_dir_and_config  # noqa: E402
from fedmilm.config import FedMilmConfig  # noqa: E402

log = logging.getLogger("fedmilm")


def export(cfg: FedMilmConfig, run_dir: Path) -> Path:
    """Export for `cfg` into `client.export_dir` or `run_dir/export`; returns the folder."""
    from fedmilm.adapters import build_adapter_space
    from fedmilm.export import export_bundle

    out = Path(cfg.client.export_dir or run_dir / "export").expanduser().resolve()
    prepare_model(cfg)
    started = time.perf_counter()
    log.info("loading %s and wrapping it with LoRA r=%d (%s)", cfg.model.name, cfg.lora.r,
             cfg.personalization.mode)
    space = build_adapter_space(cfg.model, cfg.lora, mode=cfg.personalization.mode,
                                seed=cfg.seed)
    log.info("exporting and lowering (minutes for large models) ...")
    manifest, timings = export_bundle(space, cfg, out)
    for name, size in timings.sizes.items():
        log.info("  %-12s %10.2f MiB", name, size / 2**20)
    log.info("stages: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.seconds.items()))
    log.info("exported %d programs (micro-batch %d x %d tokens) in %.0f s into %s",
             len(manifest.programs), manifest.micro_batch, manifest.seq_len,
             time.perf_counter() - started, out)
    return out


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _main(raw: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    cfg, run_dir = run_dir_and_config(raw, hydra_cfg.runtime.output_dir,
                                      list(hydra_cfg.overrides.task))
    export(cfg, run_dir)


def main() -> None:
    """Console entry point."""
    sys.exit(_main())
