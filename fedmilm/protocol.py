"""Names of everything that crosses the wire between ServerApp and ClientApp.

Server and client both import these constants, so a key can never drift between them.
"""

# ArrayRecord keys
GLOBAL_ARRAYS = "global"      # server -> phone: the current global part of the adapter
UPDATE_ARRAYS = "update"      # phone -> server: trained global part minus received global part

# ConfigRecord key and its fields
CONFIG = "config"
SERVER_ROUND = "server-round"
RUN_CONFIG = "fedmilm-config"  # the validated run config as YAML (model, LoRA, data, training)
CLIP_NORM = "clip-norm"        # adaptive clipping: this round's user-level clip (else the config's)
DEADLINE = "deadline"          # unix time after which the server no longer waits for a reply
RUN_DIR = "run-dir"            # deployment run config only: where the ServerApp writes outputs
NODE_DEVICES = "node-devices"  # deployment run config: node id -> device id from key registration

# MetricRecord key and its fields
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_TOKENS = "train-tokens"
TRAIN_SECONDS = "train-seconds"
LOSS_BASE = "loss-base"
LOSS_GLOBAL = "loss-global"
LOSS_PERSONAL = "loss-personal"   # absent when the mode has no personal part
LEDGER_TRAININGS = "ledger-trainings"  # DP-SGD: trainings the phone's ledger has charged (the
                                       # server knows them; a decrease means a reset ledger)
WITHIN_CLIP = "within-clip"       # adaptive clipping: +0.5 if the update fitted under the clip,
                                  # -0.5 if it was clipped (noised and accounted by the server)
LORA_RANK = "lora-rank"           # heterogeneous ranks: the rank the phone trained/evaluated at
DEVICE_ID = "device-id"           # query reply: the phone's stable pseudonym (its partition id)
DECLINED = "declined"             # the phone declined to train, with one of these codes:
DECLINED_BUDGET = 1               #   its DP-SGD privacy budget is spent
DECLINED_CONDITIONS = 2           #   its device policy says no (not charging, metered, hot, ...)
DECLINED_MEMORY = 3               #   training cannot fit client.memory_budget_mb
DECLINED_POLICY = 4               #   the run asks for less privacy than its own policy allows
DECLINED_LEDGER = 5               #   its privacy ledger is missing, corrupt or rolled back
DECLINED_EVALUATION = 6           #   it does not evaluate (a bridged phone keeps its losses)
DECLINE_REASONS = {DECLINED_BUDGET: "its DP-SGD budget is spent",
                   DECLINED_CONDITIONS: "its device policy says no",
                   DECLINED_MEMORY: "training does not fit its memory budget",
                   DECLINED_POLICY: "the run's privacy settings fall short of its own policy",
                   DECLINED_LEDGER: "its privacy ledger is missing, corrupt or rolled back",
                   DECLINED_EVALUATION: "it does not evaluate"}

# node_config keys
PARTITION_ID = "partition-id"     # set by Flower's simulation engine; the phone's user index
DEVICE_DIR = "device-dir"         # the phone's own storage folder (its personal adapter, ledger)
PRIVACY_POLICY = "privacy-policy" # the phone's own privacy policy file (JSON, PhonePolicy)
DIAGNOSTICS_DIR = "diagnostics-dir"  # simulation only: where a virtual phone leaves results
                                     # for the researcher, outside the wire (and the guarantee)
DEVICE_TIER = "device-tier"       # deployment: the phone's tier in lora.rank_by_tier
PHONE_LINK = "phone-link"         # deployment: the folder of the device's local link to its
                                  # warm service or bridge (socket + key; fedmilm.deploy.link)
PHONE_LINK_MAX_MB = "phone-link-max-mb"  # the largest reply the relay accepts over that link
