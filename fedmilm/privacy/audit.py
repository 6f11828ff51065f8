"""Empirical privacy measurements: canary exposure and membership-inference AUC.

Exposure (Carlini et al. 2019): rank the planted secret among `C` random candidates of the same
format by the model's loss on the canary; exposure = log2(C + 1) - log2(rank). About 0 bits means
the model prefers the secret no more than a random guess; log2(C + 1) bits means it ranks first.
Membership inference (Yeom et al. 2018, loss threshold): AUC of "lower loss means member" on
training vs held-out interactions; 0.5 is chance.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedTokenizerBase

from fedmilm.data.canary import canary_conversation, candidate_secrets
from fedmilm.data.chat import batches, encode
from fedmilm.data.synthetic import Conversation
from fedmilm.training.loss import per_example_loss


@torch.no_grad()
def conversation_losses(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                        conversations: list[Conversation], *, max_length: int,
                        batch_size: int = 32) -> list[float]:
    """Mean assistant-token loss of each conversation, in input order."""
    model.eval()
    examples = [encode(tokenizer, c, max_length) for c in conversations]
    out: list[float] = []
    for batch in batches(examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id):
        out.extend(per_example_loss(model, batch).tolist())
    return out


def exposure(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, secret: str, *,
             candidates: int, seed: int, max_length: int,
             system_prompt: str | None) -> float:
    """Exposure in bits of `secret` among `candidates` random secrets (ties count against)."""
    def conversation(s: str) -> Conversation:
        conv = canary_conversation(s)
        return [{"role": "system", "content": system_prompt}, *conv] if system_prompt else conv

    others = candidate_secrets(secret, count=candidates, seed=seed)
    losses = conversation_losses(model, tokenizer, [conversation(s) for s in [secret, *others]],
                                 max_length=max_length)
    rank = 1 + sum(loss <= losses[0] for loss in losses[1:])
    return math.log2(candidates + 1) - math.log2(rank)


def membership_auc(member_losses: list[float], nonmember_losses: list[float]) -> float:
    """P(a random member has lower loss than a random non-member), ties counted half."""
    if not member_losses or not nonmember_losses:
        raise ValueError("need members and non-members")
    wins = sum((m < n) + 0.5 * (m == n) for m in member_losses for n in nonmember_losses)
    return wins / (len(member_losses) * len(nonmember_losses))
