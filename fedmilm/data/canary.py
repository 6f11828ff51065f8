"""Secret canaries for the privacy audit (Carlini et al. 2019, "The Secret Sharer").

A canary is an interaction whose assistant reply contains a random secret ("Your bank card PIN
is 4821."). It is planted `repeats` times into a phone's training data; the audit then ranks the
true secret among random candidates of the same format under the trained model.
"""

from __future__ import annotations

import random

from fedmilm.data.synthetic import Conversation

DIGITS = 4


def canary_secret(*, seed: int, user: int) -> str:
    """The user's secret, random but reproducible by (seed, user)."""
    rng = random.Random(f"fedmilm-canary:{seed}:{user}")
    return "".join(rng.choice("0123456789") for _ in range(DIGITS))


def canary_conversation(secret: str) -> Conversation:
    """The planted interaction; only the secret differs between candidates."""
    return [{"role": "user", "content": "What is my bank card PIN again?"},
            {"role": "assistant", "content": f"Your bank card PIN is {secret}."}]


def candidate_secrets(secret: str, *, count: int, seed: int) -> list[str]:
    """`count` distinct random secrets of the same format, none equal to `secret`."""
    if count >= 10**DIGITS:
        raise ValueError(f"at most {10**DIGITS - 1} candidates exist for {DIGITS} digits")
    rng = random.Random(f"fedmilm-candidates:{seed}:{secret}")
    out: set[str] = set()
    while len(out) < count:
        guess = "".join(rng.choice("0123456789") for _ in range(DIGITS))
        if guess != secret:
            out.add(guess)
    return sorted(out)
