"""Process-wide settings every entry point applies: offline, no phoning home, quiet logs."""

from __future__ import annotations

import logging
import os
import warnings

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",        # Flower telemetry is on by default
    "FLWR_DISABLE_UPDATE_CHECK": "1",     # Flower checks for updates online
    "RAY_DISABLE_USAGE_STATS": "1",       # Ray usage stats
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",                # never reach a model hub
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",    # fork-safety warnings of HF tokenizers
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # a Ray FutureWarning on every run
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never uv-sync a second torch stack
}


VERBOSE_ENV = "FEDMILM_VERBOSE"  # "1": every library's own lines too (inherited by workers)


def verbose() -> bool:
    """Whether the user asked for the libraries' own log lines (`verbose=true`)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_logs() -> None:
    """Silence the import-time chatter of the libraries under us, unless `verbose()`. Cheap
    (no imports): `fedmilm` calls it on import, so every Ray worker is quiet before it loads
    torchao or peft."""
    if verbose():
        return
    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every wrap.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    # Opacus's per-example hooks sit on LoRA layers whose inputs come from frozen layers; the
    # hook then (correctly) sees gradients of outputs only, and torch says so on every step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing",
                            category=UserWarning)
    for noisy in ("alembic", "urllib3", "filelock"):  # INFO chatter under Hydra's root logger
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Flower's logger passes DEBUG records on (SecAgg+ logs every protocol stage of every phone),
    # and Ray workers print them through the root logger. Flower resets the level when it is
    # first imported, so `quiet_offline_env` (called after it) lowers it again.
    logging.getLogger("flwr").setLevel(logging.INFO)
    # torchao (pulled in by ExecuTorch, imported by peft) warns that its CUDA kernels do not
    # load on this CPU build, and torch warns about its pytree registrations, on every import.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # ExecuTorch 1.5.1 marks its training APIs experimental and reads its schemas with a
    # deprecated importlib helper, on every call; neither is actionable for a user.
    warnings.filterwarnings("ignore", message="This API is experimental", category=Warning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"executorch(\.|$)")


def quiet_offline_env() -> None:
    """Force the offline/no-telemetry variables (a user may not turn telemetry back on by
    accident through an inherited environment) and silence library progress bars."""
    os.environ.update(OFFLINE_ENV)
    quiet_logs()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not verbose():
        hf_logging.set_verbosity_error()
