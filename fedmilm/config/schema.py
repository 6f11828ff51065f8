"""Typed schema of the composed Hydra config.

Defaults live in `conf/`; these dataclasses only name the keys and their types, so a typo or a
wrong type in an override fails with the full key name before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class ArchitectureConfig:
    """Shape of a Llama-architecture model built from a config (random init)."""

    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    intermediate_size: int = MISSING
    max_position_embeddings: int = MISSING


@dataclass
class ModelConfig:
    """Which frozen base model the phones run."""

    source: str = MISSING  # smollm2 | llama-config | hf
    name: str = MISSING
    path: str | None = None
    dtype: str = MISSING
    quantization: str = MISSING  # none | int8 | nf4: the frozen base's decoder linears
    cache_dir: str = MISSING
    architecture: ArchitectureConfig | None = None


@dataclass
class LoraConfig:
    """LoRA adapter hyper-parameters (PEFT)."""

    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: list[str] = field(default_factory=list)
    variant: str = MISSING  # standard | ffa (A frozen at its init, only B trains and travels)
    rank_by_tier: dict[str, int] | None = None  # None: every phone uses r


@dataclass
class DataConfig:
    """Where each phone's private interactions come from."""

    source: str = MISSING  # synthetic | jsonl
    path: str | None = None
    train_per_user: int = MISSING
    heldout_per_user: int = MISSING
    heldout_fraction: float = MISSING
    zh_fraction: float = MISSING
    max_length: int = MISSING
    system_prompt: str | None = None
    canary_users: int = MISSING    # audit only: phones 0..k-1 get a secret canary planted
    canary_repeats: int = MISSING  # audit only: copies of the canary per such phone


@dataclass
class PersonalizationConfig:
    """How the adapter splits into a travelling global part and a personal part."""

    mode: str = MISSING  # none | fedsa | dual


@dataclass
class TrainConfig:
    """Local training on one phone in one round."""

    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    eval_batch_size: int = MISSING
    device: str = MISSING  # auto | cpu | cuda: where virtual phones train and evaluate


@dataclass
class FederationConfig:
    """Population, cohort and round structure of the federation."""

    num_clients: int = MISSING
    clients_per_round: int = MISSING
    clients_per_eval: int | None = None
    rounds: int = MISSING
    min_replies: int = MISSING
    round_timeout_s: float = MISSING
    max_update_norm: float = MISSING
    norm_bound_multiple: float = MISSING
    cpus_per_client: int = MISSING
    gpus_per_client: float = MISSING  # GPU share per virtual phone (0.25: four share one)
    total_cpus: int | None = None
    max_in_flight: int | None = None  # messages out at once; None: all (simulation sets it)
    progress_every_s: float = MISSING  # an in-round progress line this often (0: none)
    ray_address: str | None = None  # simulation: attach to this Ray cluster (host:port)


@dataclass
class SamplePrivacyConfig:
    """DP-SGD on the phone (per-example clipping and noise, Opacus)."""

    noise_multiplier: float | None = None   # None: calibrated from target_epsilon
    max_grad_norm: float = MISSING
    target_epsilon: float | None = None     # the phone refuses to train past it


@dataclass
class UserPrivacyConfig:
    """User-level DP on the aggregate (clip each phone's update, noise the sum)."""

    mechanism: str = MISSING  # poisson (DP-FedAvg) | ftrl (DP-FTRL, tree aggregation)
    noise_multiplier: float | None = None   # None: calibrated from target_epsilon
    clip_norm: float = MISSING
    target_epsilon: float | None = None     # the server stops before exceeding it
    min_separation: int | None = None       # ftrl: rounds between two of a phone's trainings
    max_participations: int | None = None   # ftrl: trainings per phone over the run
    adaptive_clip: bool = MISSING           # the clip follows a quantile of update norms
    clip_quantile: float = MISSING
    clip_lr: float = MISSING
    clip_count_noise: float | None = None   # None: max(clients_per_round / 20, sigma)
    max_noise_to_signal: float = MISSING    # a round's noise norm over the largest signal
    allow_swamped: bool = MISSING           # run although noise swamps the signal
    distributed_noise: float | None = None  # SecAgg+ + ftrl: phones' Skellam noise std / clip


@dataclass
class PhonePolicyConfig:
    """The simulated and local phones' own privacy policy (null: what the run asks)."""

    allow_no_dp: bool = MISSING
    min_sample_noise: float | None = None
    max_sample_epsilon: float | None = None
    min_user_noise: float | None = None
    min_distributed_noise: float | None = None
    max_user_clip: float | None = None
    delta: float | None = None
    allow_seeded_noise: bool | None = None


@dataclass
class PrivacyConfig:
    """Which privacy levels are on, their parameters and the accounting."""

    mode: str = MISSING  # none | sample | user | both
    delta: float = MISSING
    accountant: str = MISSING  # prv (tight upper bound) | rdp
    seeded_noise: bool = MISSING  # True: reproducible noise (tests); False: OS entropy
    sample: SamplePrivacyConfig = field(default_factory=SamplePrivacyConfig)
    user: UserPrivacyConfig = field(default_factory=UserPrivacyConfig)
    phone: PhonePolicyConfig = field(default_factory=PhonePolicyConfig)

    @property
    def any_dp(self) -> bool:
        return self.mode != "none"

    @property
    def sample_level(self) -> bool:
        return self.mode in ("sample", "both")

    @property
    def user_level(self) -> bool:
        return self.mode in ("user", "both")


@dataclass
class AuditConfig:
    """`fedmilm-audit`: which privacy modes to compare and how hard to look."""

    modes: list[str] = field(default_factory=list)
    canary_users: int = MISSING
    canary_repeats: int = MISSING
    candidates: int = MISSING        # random secrets each canary is ranked against
    mia_per_phone: int = MISSING     # member and non-member interactions per phone for the AUC


@dataclass
class AggregationConfig:
    """How accepted updates become one global step (see `conf/aggregation/`)."""

    method: str = MISSING            # fedavg | trimmed_mean | median | krum
    trim_fraction: float = MISSING
    krum_byzantine: int = MISSING
    server_optimizer: str = MISSING  # sgd | momentum | adam on the mean update
    server_lr: float = MISSING
    server_momentum: float = MISSING  # momentum coefficient; adam's beta1
    server_beta2: float = MISSING
    server_eps: float = MISSING
    secure: bool = MISSING           # SecAgg+ through Flower's legacy workflow
    secagg_shares: int = MISSING
    secagg_threshold: int = MISSING
    secagg_clip_range: float = MISSING
    secagg_quant_range: int = MISSING
    upload: str = MISSING            # fp32 | fp16 | int8: how phones' updates travel
    download: str = MISSING          # fp32 | fp16 | int8: how the global part travels down


@dataclass
class DeviceConfig:
    """When a phone may train, and simulated availability (see `conf/device/`)."""

    check_conditions: bool = MISSING
    require_charging: bool = MISSING
    min_battery_percent: float = MISSING
    require_unmetered: bool = MISSING
    max_temperature_c: float = MISSING
    allow_unknown: bool = MISSING
    availability: str = MISSING       # always | synthetic | trace
    availability_path: str | None = None
    slots_per_round: int = MISSING


@dataclass
class DeployConfig:
    """`fedmilm-deploy`: the local SuperLink and SuperNodes (see `conf/deploy/`)."""

    insecure: bool = MISSING
    host: str = MISSING
    port: int | None = None
    credentials_dir: str | None = None
    startup_timeout_s: float = MISSING
    threads_per_phone: int | None = None  # CPU threads per local phone; None = cores / cohort
    connect: str | None = None          # host:port of an existing SuperLink: submit only
    server_run_dir: str | None = None   # with connect: the run directory on the server's host
    warm_phones: bool = MISSING          # one long-lived phone service per device + a relay
    max_message_mb: int = MISSING        # largest message over a phone's local link
    bridged_phones: int = 0              # the last K phones join through the HTTPS bridge
    bridge_port: int | None = None       # the bridge's port; None = a free one
    reference_phones: bool = MISSING     # start a Python reference phone per bridged device


@dataclass
class ClientConfig:
    """How a phone runs local training (see `conf/client/`)."""

    runtime: str = MISSING                 # eager | executorch
    micro_batch: int | None = None         # None: whole batch (or what the budget allows)
    gradient_checkpointing: str = MISSING  # auto | on | off
    memory_budget_mb: float | None = None  # None: no budget
    export_dir: str | None = None          # executorch: bundle folder (None: RUN_DIR/export)
    delegate: str = MISSING                # executorch: none | xnnpack


@dataclass
class FedMilmConfig:
    """Root of the composed config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    seed: int = MISSING
    verbose: bool = False            # the libraries' own log lines too (torch, Flower, Ray)
    resume: str | None = None        # a run directory to continue from its last checkpoint
