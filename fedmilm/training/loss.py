"""Causal-LM loss over assistant tokens, summed so that batches of different sizes combine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedmilm.data.chat import IGNORE, Batch


def _on_model_device(model: torch.nn.Module, batch: Batch) -> Batch:
    """The batch where the model is (a GPU in simulation with `train.device=cuda`)."""
    device = next(model.parameters()).device
    if batch.input_ids.device == device:
        return batch
    return Batch(batch.input_ids.to(device), batch.attention_mask.to(device),
                 batch.labels.to(device))


def token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, T-1) next-token cross-entropies, 0 where unlabelled; (B, T-1) labelled mask)."""
    batch = _on_model_device(model, batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # Predict token t+1 from positions <= t: logits (B, T-1, V) against labels (B, T-1).
    shifted, targets = logits[:, :-1].float(), batch.labels[:, 1:]
    token = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="none").view(targets.shape)
    return token, targets != IGNORE


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, number of such positions)."""
    token, labelled = token_losses(model, batch)
    return token.sum(), int(labelled.sum())


def per_example_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each example over its own assistant tokens.

    Each interaction counts once whatever its length: the unit DP-SGD clips and the training
    objective agree.
    """
    token, labelled = token_losses(model, batch)
    return token.sum(dim=1) / labelled.sum(dim=1).clamp(min=1)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[Batch]) -> float:
    """Mean held-out loss per assistant token."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = token_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    if count == 0:
        raise ValueError("no assistant tokens to evaluate on (all truncated away?)")
    return total / count
