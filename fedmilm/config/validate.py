"""Semantic checks of a composed config, collected into one error before any work starts."""

from __future__ import annotations

from pathlib import Path

from fedmilm.config.schema import FedMilmConfig

MODEL_SOURCES = ("smollm2", "llama-config", "hf")
DATA_SOURCES = ("synthetic", "jsonl")
PERSONALIZATION_MODES = ("none", "fedsa", "dual")
LORA_VARIANTS = ("standard",)
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """One or more config values are invalid; the message has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _choice(problems: list[str], key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(problems: list[str], key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        problems.append(f"{key}={value} is invalid; it must be {bound}")


def _check_model(cfg: FedMilmConfig, problems: list[str]) -> None:
    model = cfg.model
    _choice(problems, "model.source", model.source, MODEL_SOURCES)
    _choice(problems, "model.dtype", model.dtype, DTYPES)
    if model.source == "hf":
        if not model.path:
            problems.append("model.path is missing; model=hf needs model.path=DIR (a local "
                            "Hugging Face causal LM folder with config.json)")
        elif not (Path(model.path).expanduser() / "config.json").is_file():
            problems.append(f"model.path={model.path!r} has no config.json; point it at a local "
                            "Hugging Face causal LM folder")
    if model.source == "llama-config" and model.architecture is None:
        problems.append("model.architecture is missing; model.source=llama-config needs it")


def _check_lora(cfg: FedMilmConfig, problems: list[str]) -> None:
    _positive(problems, "lora.r", cfg.lora.r)
    _positive(problems, "lora.alpha", cfg.lora.alpha)
    if not 0 <= cfg.lora.dropout < 1:
        problems.append(f"lora.dropout={cfg.lora.dropout} is invalid; it must be in [0, 1)")
    if not cfg.lora.target_modules:
        problems.append("lora.target_modules is empty; name at least one module, e.g. [q_proj]")
    _choice(problems, "lora.variant", cfg.lora.variant, LORA_VARIANTS)
    _choice(problems, "personalization.mode", cfg.personalization.mode, PERSONALIZATION_MODES)


def _check_data(cfg: FedMilmConfig, problems: list[str]) -> None:
    data = cfg.data
    _choice(problems, "data.source", data.source, DATA_SOURCES)
    if data.source == "jsonl":
        if not data.path:
            problems.append("data.path is missing; data=jsonl needs data.path=DIR with one "
                            "<user>.jsonl file per phone")
        elif not Path(data.path).expanduser().is_dir():
            problems.append(f"data.path={data.path!r} is not a directory")
    _positive(problems, "data.train_per_user", data.train_per_user)
    _positive(problems, "data.heldout_per_user", data.heldout_per_user)
    if not 0 < data.heldout_fraction < 1:
        problems.append(f"data.heldout_fraction={data.heldout_fraction} must be in (0, 1)")
    if not 0 <= data.zh_fraction <= 1:
        problems.append(f"data.zh_fraction={data.zh_fraction} must be in [0, 1]")
    if data.max_length < 16:
        problems.append(f"data.max_length={data.max_length} is too short; use at least 16 tokens")


def _check_train(cfg: FedMilmConfig, problems: list[str]) -> None:
    _positive(problems, "train.epochs", cfg.train.epochs)
    _positive(problems, "train.batch_size", cfg.train.batch_size)
    _positive(problems, "train.eval_batch_size", cfg.train.eval_batch_size)
    _positive(problems, "train.lr", cfg.train.lr)
    _positive(problems, "train.weight_decay", cfg.train.weight_decay, allow_zero=True)


def _check_federation(cfg: FedMilmConfig, problems: list[str]) -> None:
    fed = cfg.federation
    _positive(problems, "federation.num_clients", fed.num_clients)
    _positive(problems, "federation.clients_per_round", fed.clients_per_round)
    _positive(problems, "federation.rounds", fed.rounds)
    _positive(problems, "federation.round_timeout_s", fed.round_timeout_s)
    _positive(problems, "federation.max_update_norm", fed.max_update_norm)
    _positive(problems, "federation.cpus_per_client", fed.cpus_per_client)
    if fed.clients_per_round > fed.num_clients:
        problems.append(f"federation.clients_per_round={fed.clients_per_round} exceeds "
                        f"federation.num_clients={fed.num_clients}; it must be <= num_clients")
    if fed.clients_per_eval is not None and not 0 < fed.clients_per_eval <= fed.num_clients:
        problems.append(f"federation.clients_per_eval={fed.clients_per_eval} must be in "
                        f"[1, federation.num_clients={fed.num_clients}] or null (all)")
    if not 1 <= fed.min_replies <= fed.clients_per_round:
        problems.append(f"federation.min_replies={fed.min_replies} must be in "
                        f"[1, federation.clients_per_round={fed.clients_per_round}]")


def validate_config(cfg: FedMilmConfig) -> None:
    """Raise `ConfigError` listing every invalid value, each with its key and the fix."""
    problems: list[str] = []
    for check in (_check_model, _check_lora, _check_data, _check_train, _check_federation):
        check(cfg, problems)
    if problems:
        raise ConfigError(problems)
