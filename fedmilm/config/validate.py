"""Semantic checks of a composed config, collected into one error before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

from fedmilm.bridge.limits import bridged_problems
from fedmilm.config.schema import FedMilmConfig
from fedmilm.privacy.secagg_grid import FLOAT32_EXACT, SECAGG_MODULUS, is_power_of_two

MODEL_SOURCES = ("smollm2", "llama-config", "hf")
DATA_SOURCES = ("synthetic", "jsonl")
PERSONALIZATION_MODES = ("none", "fedsa", "dual")
LORA_VARIANTS = ("standard", "ffa")
PRIVACY_MODES = ("none", "sample", "user", "both")
ACCOUNTANT_NAMES = ("prv", "rdp")
USER_MECHANISMS = ("poisson", "ftrl")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = ("none", "int8", "nf4")
AGGREGATION_METHODS = ("fedavg", "trimmed_mean", "median", "krum")
AVAILABILITY = ("always", "synthetic", "trace")
RUNTIMES = ("eager", "executorch")
WIRE_FORMATS = ("fp32", "fp16", "int8")  # how adapter tensors travel (fedmilm.adapters.wire)
DELEGATES = ("none", "xnnpack")  # ExecuTorch backends the model programs may be lowered to
CHECKPOINTING = ("auto", "on", "off")
TRAIN_DEVICES = ("auto", "cpu", "cuda")


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
    _choice(problems, "model.quantization", model.quantization, QUANTIZATIONS)
    if model.source == "hf":
        if not model.path:
            problems.append("model.path is missing; model=hf needs model.path=DIR (a local "
                            "Hugging Face causal LM folder with config.json)")
        elif not (Path(model.path).expanduser() / "config.json").is_file():
            problems.append(f"model.path={model.path!r} has no config.json; point it at a local "
                            "Hugging Face causal LM folder")
        else:
            _check_hf_config(problems, Path(model.path).expanduser() / "config.json")
    if model.source == "llama-config" and model.architecture is None:
        problems.append("model.architecture is missing; model.source=llama-config needs it")


def _check_hf_config(problems: list[str], path: Path) -> None:
    """A Hugging Face config.json must at least be a JSON object naming its model type."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise ValueError("no \"model_type\"")
    except (ValueError, UnicodeDecodeError) as err:
        problems.append(f"model.path: {path} is not a Hugging Face model config ({err})")


def _check_lora(cfg: FedMilmConfig, problems: list[str]) -> None:
    _positive(problems, "lora.r", cfg.lora.r)
    _positive(problems, "lora.alpha", cfg.lora.alpha)
    if not 0 <= cfg.lora.dropout < 1:
        problems.append(f"lora.dropout={cfg.lora.dropout} is invalid; it must be in [0, 1)")
    if not cfg.lora.target_modules:
        problems.append("lora.target_modules is empty; name at least one module, e.g. [q_proj]")
    _choice(problems, "lora.variant", cfg.lora.variant, LORA_VARIANTS)
    tiers = cfg.lora.rank_by_tier
    if tiers:
        if any(rank <= 0 for rank in tiers.values()):
            problems.append(f"lora.rank_by_tier={dict(tiers)} holds a rank <= 0")
        elif max(tiers.values()) != cfg.lora.r:
            problems.append(f"lora.r={cfg.lora.r} must equal the largest rank in "
                            f"lora.rank_by_tier={dict(tiers)} (the server keeps that rank)")
        if cfg.privacy.user_level or cfg.aggregation.secure or cfg.aggregation.method != "fedavg":
            problems.append("lora.rank_by_tier needs plain aggregation: it is not combinable "
                            "with user-level DP, aggregation.secure or a robust method yet")
    _choice(problems, "personalization.mode", cfg.personalization.mode, PERSONALIZATION_MODES)
    if cfg.lora.variant == "ffa" and cfg.personalization.mode == "fedsa":
        problems.append("lora.variant=ffa freezes A, which personalization=fedsa shares: nothing "
                        "global would train; use personalization=none or dual with ffa")


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
    _choice(problems, "train.device", cfg.train.device, TRAIN_DEVICES)


def _check_client(cfg: FedMilmConfig, problems: list[str]) -> None:
    client = cfg.client
    _choice(problems, "client.runtime", client.runtime, RUNTIMES)
    _choice(problems, "client.delegate", client.delegate, DELEGATES)
    _choice(problems, "client.gradient_checkpointing", client.gradient_checkpointing,
            CHECKPOINTING)
    if client.micro_batch is not None:
        _positive(problems, "client.micro_batch", client.micro_batch)
    if client.memory_budget_mb is not None:
        _positive(problems, "client.memory_budget_mb", client.memory_budget_mb)
    if client.runtime == "executorch":
        if cfg.lora.rank_by_tier:
            problems.append("client.runtime=executorch exports one program per adapter shape; "
                            "lora.rank_by_tier is not supported with it yet")
        if client.gradient_checkpointing == "on" or client.memory_budget_mb is not None:
            problems.append("client.runtime=executorch: the exported program fixes its memory "
                            "plan at export; set client.micro_batch instead of "
                            "client.memory_budget_mb / client.gradient_checkpointing")
        if cfg.model.quantization == "nf4":
            problems.append("model.quantization=nf4 is eager-only: ExecuTorch's CPU kernels have "
                            "no 4-bit lookup path; use int8 with client.runtime=executorch")
    if client.export_dir and client.runtime != "executorch":
        problems.append("client.export_dir only applies with client.runtime=executorch")


def _check_federation(cfg: FedMilmConfig, problems: list[str]) -> None:
    fed = cfg.federation
    _positive(problems, "federation.num_clients", fed.num_clients)
    _positive(problems, "federation.clients_per_round", fed.clients_per_round)
    _positive(problems, "federation.rounds", fed.rounds)
    _positive(problems, "federation.round_timeout_s", fed.round_timeout_s)
    _positive(problems, "federation.max_update_norm", fed.max_update_norm)
    if fed.norm_bound_multiple <= 1:
        problems.append(f"federation.norm_bound_multiple={fed.norm_bound_multiple} must be > 1 "
                        "(a multiple of the round's median update norm)")
    _positive(problems, "federation.cpus_per_client", fed.cpus_per_client)
    _positive(problems, "federation.gpus_per_client", fed.gpus_per_client, allow_zero=True)
    if fed.gpus_per_client > 1 and not float(fed.gpus_per_client).is_integer():
        problems.append(f"federation.gpus_per_client={fed.gpus_per_client} must be a fraction "
                        "<= 1 (phones sharing a GPU) or a whole number of GPUs")
    if fed.max_in_flight is not None:
        _positive(problems, "federation.max_in_flight", fed.max_in_flight)
    _positive(problems, "federation.progress_every_s", fed.progress_every_s, allow_zero=True)
    if fed.clients_per_round > fed.num_clients:
        problems.append(f"federation.clients_per_round={fed.clients_per_round} exceeds "
                        f"federation.num_clients={fed.num_clients}; it must be <= num_clients")
    if fed.clients_per_eval is not None and not 0 < fed.clients_per_eval <= fed.num_clients:
        problems.append(f"federation.clients_per_eval={fed.clients_per_eval} must be in "
                        f"[1, federation.num_clients={fed.num_clients}] or null (all)")
    if fed.ray_address and fed.total_cpus is not None:
        problems.append("federation.total_cpus applies to a private Ray instance only; with "
                        "federation.ray_address the cluster's own CPUs count (set it to null)")
    if not 1 <= fed.min_replies <= fed.clients_per_round:
        problems.append(f"federation.min_replies={fed.min_replies} must be in "
                        f"[1, federation.clients_per_round={fed.clients_per_round}]")


def _check_noise(problems: list[str], key: str, noise: float | None,
                 target: float | None) -> None:
    if noise is None and target is None:
        problems.append(f"{key}.noise_multiplier and {key}.target_epsilon are both null; set "
                        "the noise or the epsilon target to calibrate it from")
    if noise is not None:
        _positive(problems, f"{key}.noise_multiplier", noise)
    if target is not None:
        _positive(problems, f"{key}.target_epsilon", target)


def _check_privacy(cfg: FedMilmConfig, problems: list[str]) -> None:
    priv = cfg.privacy
    _choice(problems, "privacy.mode", priv.mode, PRIVACY_MODES)
    _choice(problems, "privacy.accountant", priv.accountant, ACCOUNTANT_NAMES)
    if not 0 < priv.delta < 1:
        problems.append(f"privacy.delta={priv.delta} must be in (0, 1)")
    if priv.sample_level:
        _check_noise(problems, "privacy.sample", priv.sample.noise_multiplier,
                     priv.sample.target_epsilon)
        _positive(problems, "privacy.sample.max_grad_norm", priv.sample.max_grad_norm)
        if cfg.train.batch_size < 2:
            problems.append(f"train.batch_size={cfg.train.batch_size} is too small for DP-SGD: "
                            "the noise would drown every example; use at least 2 (8+ advised)")
    if priv.user_level:
        _check_noise(problems, "privacy.user", priv.user.noise_multiplier,
                     priv.user.target_epsilon)
        _positive(problems, "privacy.user.clip_norm", priv.user.clip_norm)
        _choice(problems, "privacy.user.mechanism", priv.user.mechanism, USER_MECHANISMS)
        _positive(problems, "privacy.user.max_noise_to_signal", priv.user.max_noise_to_signal)
        for key in ("min_separation", "max_participations", "clip_count_noise"):
            value = getattr(priv.user, key)
            if value is not None:
                _positive(problems, f"privacy.user.{key}", value)
        if priv.user.adaptive_clip:
            if not 0 < priv.user.clip_quantile < 1:
                problems.append(f"privacy.user.clip_quantile={priv.user.clip_quantile} must be "
                                "in (0, 1)")
            _positive(problems, "privacy.user.clip_lr", priv.user.clip_lr)
            if cfg.aggregation.secure:
                problems.append("privacy.user.adaptive_clip=true needs each phone's clip count, "
                                "which aggregation.secure=true does not aggregate; pick one")
        if priv.user.distributed_noise is not None:
            _check_distributed(cfg, problems)
        if cfg.federation.clients_per_round < 2:
            problems.append("federation.clients_per_round must be >= 2 with user-level DP: one "
                            "phone's update would be released with noise only")


def _check_distributed(cfg: FedMilmConfig, problems: list[str]) -> None:
    """Distributed noise rides on SecAgg+'s integer grid and on DP-FTRL's public participation
    (the server withholds a sum with fewer shares than it charged: under Poisson sampling that
    decision would depend on the secret cohort size)."""
    user, agg = cfg.privacy.user, cfg.aggregation
    _positive(problems, "privacy.user.distributed_noise", user.distributed_noise)
    if not agg.secure:
        problems.append("privacy.user.distributed_noise needs aggregation.secure=true: the "
                        "phones' noise protects only what SecAgg+ hides")
    if user.mechanism != "ftrl":
        problems.append("privacy.user.distributed_noise needs privacy.user.mechanism=ftrl: the "
                        "server withholds sums with too few shares, which under poisson would "
                        "depend on the secret cohort size")
    if not is_power_of_two(agg.secagg_clip_range) or not is_power_of_two(agg.secagg_quant_range):
        problems.append("privacy.user.distributed_noise needs aggregation.secagg_clip_range and "
                        "aggregation.secagg_quant_range to be powers of two (an exact grid)")
    if agg.secagg_quant_range > FLOAT32_EXACT:
        problems.append(f"aggregation.secagg_quant_range={agg.secagg_quant_range} must be <= "
                        "2^24 with distributed noise (grid values exact in float32)")


def _check_aggregation(cfg: FedMilmConfig, problems: list[str]) -> None:
    agg, k = cfg.aggregation, cfg.federation.clients_per_round
    _choice(problems, "aggregation.method", agg.method, AGGREGATION_METHODS)
    if agg.method != "fedavg" and cfg.privacy.user_level:
        problems.append(f"aggregation.method={agg.method} with user-level DP: the noise is "
                        "calibrated to the mean of clipped updates; use aggregation.method=fedavg")
    if agg.method != "fedavg" and agg.secure:
        problems.append(f"aggregation.method={agg.method} needs every update, but "
                        "aggregation.secure=true shows the server only their sum; pick one")
    for direction in ("upload", "download"):
        fmt = getattr(agg, direction)
        _choice(problems, f"aggregation.{direction}", fmt, WIRE_FORMATS)
        if agg.secure and fmt != "fp32":
            problems.append(f"aggregation.{direction}={fmt} with aggregation.secure=true: "
                            "SecAgg+ quantises the updates itself (secagg_quant_range) and "
                            f"carries float32; use aggregation.{direction}=fp32")
    _choice(problems, "aggregation.server_optimizer", agg.server_optimizer, SERVER_OPTIMIZERS)
    _positive(problems, "aggregation.server_lr", agg.server_lr)
    if not 0 <= agg.server_momentum < 1 or not 0 <= agg.server_beta2 < 1:
        problems.append(f"aggregation.server_momentum={agg.server_momentum} and "
                        f"aggregation.server_beta2={agg.server_beta2} must be in [0, 1)")
    _positive(problems, "aggregation.server_eps", agg.server_eps)
    if not 0 <= agg.trim_fraction < 0.5:
        problems.append(f"aggregation.trim_fraction={agg.trim_fraction} must be in [0, 0.5)")
    elif agg.method == "trimmed_mean" and int(agg.trim_fraction * k) < 1:
        problems.append(f"aggregation.trim_fraction={agg.trim_fraction} trims nobody from a "
                        f"cohort of federation.clients_per_round={k}; use at least {1 / k:.3g}")
    if agg.method == "krum" and not 0 <= agg.krum_byzantine <= max(0, k - 3):
        problems.append(f"aggregation.krum_byzantine={agg.krum_byzantine} must be in [0, "
                        f"clients_per_round - 3 = {k - 3}]: Krum needs n > f + 2")
    if agg.secure:
        if not 3 <= agg.secagg_shares <= k:
            problems.append(f"aggregation.secagg_shares={agg.secagg_shares} must be in [3, "
                            f"federation.clients_per_round={k}] (Flower's SecAgg+ needs 3+)")
        if not 2 <= agg.secagg_threshold < agg.secagg_shares:
            problems.append(f"aggregation.secagg_threshold={agg.secagg_threshold} must be in "
                            f"[2, aggregation.secagg_shares={agg.secagg_shares})")
        if cfg.federation.min_replies < agg.secagg_threshold:
            problems.append(f"federation.min_replies={cfg.federation.min_replies} is below "
                            f"aggregation.secagg_threshold={agg.secagg_threshold}: SecAgg+ "
                            "cannot unmask fewer phones than its threshold")
        _positive(problems, "aggregation.secagg_clip_range", agg.secagg_clip_range)
        _positive(problems, "aggregation.secagg_quant_range", agg.secagg_quant_range)
        if 2 * k * agg.secagg_quant_range > SECAGG_MODULUS:
            problems.append(f"federation.clients_per_round={k} x aggregation.secagg_quant_range="
                            f"{agg.secagg_quant_range} (x2 headroom) overflows SecAgg+'s 2^32 "
                            "modulus: lower the quantisation range")


def _check_deploy(cfg: FedMilmConfig, problems: list[str]) -> None:
    deploy = cfg.deploy
    for key, port in (("port", deploy.port), ("bridge_port", deploy.bridge_port)):
        if port is not None and not 0 < port < 65536:
            problems.append(f"deploy.{key}={port} must be in [1, 65535] or null (a free one)")
    if deploy.connect and not deploy.insecure and not deploy.credentials_dir:
        problems.append(f"deploy.connect={deploy.connect} needs deploy.credentials_dir (the "
                        "folder holding the SuperLink's ca.crt), or deploy.insecure=true")
    if deploy.server_run_dir and not deploy.connect:
        problems.append("deploy.server_run_dir only applies with deploy.connect=HOST:PORT")
    _positive(problems, "deploy.startup_timeout_s", deploy.startup_timeout_s)
    _positive(problems, "deploy.max_message_mb", deploy.max_message_mb)
    if not 0 <= deploy.bridged_phones <= cfg.federation.num_clients:
        problems.append(f"deploy.bridged_phones={deploy.bridged_phones} must be in [0, "
                        f"federation.num_clients={cfg.federation.num_clients}]")
    elif deploy.bridged_phones:
        problems.extend(f"deploy.bridged_phones: {p}" for p in bridged_problems(cfg))
    if deploy.threads_per_phone is not None:
        _positive(problems, "deploy.threads_per_phone", deploy.threads_per_phone)


def _check_device(cfg: FedMilmConfig, problems: list[str]) -> None:
    device = cfg.device
    _choice(problems, "device.availability", device.availability, AVAILABILITY)
    if not 0 <= device.min_battery_percent <= 100:
        problems.append(f"device.min_battery_percent={device.min_battery_percent} must be in "
                        "[0, 100]")
    _positive(problems, "device.slots_per_round", device.slots_per_round)
    if device.availability == "trace":
        if not device.availability_path:
            problems.append("device.availability=trace needs device.availability_path=CSV")
        elif not Path(device.availability_path).expanduser().is_file():
            problems.append(f"device.availability_path={device.availability_path!r} is not a "
                            "file")


def validate_config(cfg: FedMilmConfig) -> None:
    """Raise `ConfigError` listing every invalid value, each with its key and the fix."""
    problems: list[str] = []
    for check in (_check_model, _check_lora, _check_data, _check_train, _check_client,
                  _check_federation,
                  _check_privacy, _check_aggregation, _check_deploy, _check_device):
        check(cfg, problems)
    if problems:
        raise ConfigError(problems)
