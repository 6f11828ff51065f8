"""A phone's own privacy policy: the least privacy it accepts, whatever the server asks.

The server's run config says which DP the run uses; a phone trusts only its own code and its
own node config, so it checks every request against this policy and declines what falls short.
A deployed phone reads the policy from the JSON file its node config names; a simulated phone
from its own storage (`devices/privacy_policy.json`, written by `fedmilm-simulate` from
`privacy.phone.*` at launch, or `devices/<id>/privacy_policy.json` for one phone).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from fedmilm.config.schema import PrivacyConfig

POLICY_FILE = "privacy_policy.json"
OPTIONAL = {"min_distributed_noise"}  # added later: older policy files stay valid


@dataclass(frozen=True)
class PhonePolicy:
    """What a phone insists on before it trains."""

    allow_no_dp: bool                  # train in a run with privacy=none
    min_sample_noise: float            # DP-SGD noise multiplier it accepts at least
    max_sample_epsilon: float | None   # its own cap on the ledger (None: the run's target)
    min_user_noise: float              # user-level noise multiplier the run must announce
    max_user_clip: float | None        # user-level clip norm it accepts at most
    delta: float                       # the delta its ledger accounts at; the run's must be <=
    allow_seeded_noise: bool           # reproducible DP randomness (simulation tests only)
    min_distributed_noise: float = 0.0  # phones' own noise (protection from the server itself)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str, where: str) -> PhonePolicy:
        """Parse a policy file; `ValueError` naming `where` on anything malformed."""
        try:
            raw = json.loads(text)
            fields = {f.name for f in dataclasses.fields(PhonePolicy)}
            if not isinstance(raw, dict) or not fields - OPTIONAL <= set(raw) <= fields:
                raise ValueError(f"needs exactly the keys {sorted(fields)} "
                                 f"({', '.join(sorted(OPTIONAL))} optional)")
            return PhonePolicy(**raw)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: not a valid privacy policy ({err})") from err

    def refusal(self, privacy: PrivacyConfig, sample_noise: float | None) -> str | None:
        """Why this phone refuses the run's privacy settings, or None when it accepts them.
        `sample_noise`: the DP-SGD noise multiplier the phone would train with."""
        if privacy.mode == "none":
            return None if self.allow_no_dp else "the run has no differential privacy"
        if privacy.seeded_noise and not self.allow_seeded_noise:
            return "the run asks for reproducible (seeded) DP randomness"
        if privacy.delta > self.delta:
            return f"delta {privacy.delta:g} > the phone's {self.delta:g}"
        if privacy.sample_level and (sample_noise or 0.0) < self.min_sample_noise:
            return f"DP-SGD noise {sample_noise} < the phone's minimum {self.min_sample_noise:g}"
        if privacy.user_level:
            noise = privacy.user.noise_multiplier or 0.0
            if noise < self.min_user_noise:
                return f"user-level noise {noise:g} < the phone's minimum {self.min_user_noise:g}"
            distributed = privacy.user.distributed_noise or 0.0
            if distributed < self.min_distributed_noise:
                return (f"distributed noise {distributed:g} < the phone's minimum "
                        f"{self.min_distributed_noise:g}")
            if self.max_user_clip is not None and privacy.user.clip_norm > self.max_user_clip:
                return (f"user-level clip {privacy.user.clip_norm:g} > the phone's maximum "
                        f"{self.max_user_clip:g}")
        return None

    def sample_target(self, run_target: float | None) -> float | None:
        """The ledger cap the phone enforces: the stricter of its own and the run's."""
        caps = [c for c in (self.max_sample_epsilon, run_target) if c is not None]
        return min(caps) if caps else None


def read_policy(path: Path) -> PhonePolicy:
    """The policy at `path`; `ValueError` when it is missing or malformed."""
    if not path.is_file():
        raise ValueError(f"{path}: no privacy policy there")
    return PhonePolicy.from_json(path.read_text(encoding="utf-8"), str(path))


def policy_for_run(privacy: PrivacyConfig) -> PhonePolicy:
    """The policy of phones whose owner launched this run: `privacy.phone.*`, where null means
    what the run itself asks (for the clip under adaptive clipping: no cap)."""
    phone, sample, user = privacy.phone, privacy.sample, privacy.user

    def pick(value, default):  # noqa: ANN001, ANN202 - one of several scalar types
        return default if value is None else value

    return PhonePolicy(
        allow_no_dp=phone.allow_no_dp,
        min_sample_noise=float(pick(phone.min_sample_noise, sample.noise_multiplier or 0.0)),
        max_sample_epsilon=pick(phone.max_sample_epsilon, sample.target_epsilon),
        min_user_noise=float(pick(phone.min_user_noise, user.noise_multiplier or 0.0)),
        # an adapted clip moves the noise with it (epsilon stays): no cap unless one is set
        max_user_clip=pick(phone.max_user_clip, None if user.adaptive_clip else user.clip_norm),
        delta=float(pick(phone.delta, privacy.delta)),
        allow_seeded_noise=bool(pick(phone.allow_seeded_noise, privacy.seeded_noise)),
        min_distributed_noise=float(pick(phone.min_distributed_noise,
                                         user.distributed_noise or 0.0)))


def write_phone_policy(privacy: PrivacyConfig, folder: Path) -> None:
    """Write the phones' own policy (`privacy.phone.*`) into their storage `folder`: the phones
    of a simulation, or of a local deployment, belong to whoever launches it. Kept as it is when
    it exists (a resumed run, or a policy the researcher wrote for the phones by hand)."""
    path = folder / POLICY_FILE
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(policy_for_run(privacy).to_json(), encoding="utf-8")
