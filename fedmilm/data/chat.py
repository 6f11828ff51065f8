"""Chat-template encoding with the loss on the assistant's tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedmilm.data.synthetic import Conversation

IGNORE = -100  # label of tokens that carry no loss (PyTorch cross-entropy's ignore_index)


@dataclass(frozen=True)
class Example:
    """One tokenised conversation: ids and labels of equal length."""

    input_ids: list[int]
    labels: list[int]


def _ids(tokenizer: PreTrainedTokenizerBase, conversation: Conversation, *,
         generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer: PreTrainedTokenizerBase, conversation: Conversation,
           max_length: int) -> Example:
    """Tokenise with the model's chat template; label only assistant turns (and their end token).

    Each assistant turn's span is found by rendering the conversation up to the turn with and
    without it, which is exact for templates whose renderings are prefixes of one another.
    """
    input_ids = _ids(tokenizer, conversation, generation_prompt=False)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, conversation[:i], generation_prompt=True))
        end = len(_ids(tokenizer, conversation[: i + 1], generation_prompt=False))
        labels[start:end] = input_ids[start:end]
    return Example(input_ids=input_ids[:max_length], labels=labels[:max_length])


def encode_all(tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation],
               max_length: int) -> list[Example]:
    """Encode a user's conversations, dropping any whose assistant part was truncated away."""
    examples = [encode(tokenizer, c, max_length) for c in conversations]
    return [e for e in examples if any(label != IGNORE for label in e.labels[1:])]


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors, each (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def target_tokens(self) -> int:
        """Tokens that carry loss (after the one-position shift of causal LM training)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Pad a list of examples to the longest one."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


def batches(examples: list[Example], *, batch_size: int, pad_id: int,
            generator: torch.Generator | None = None) -> list[Batch]:
    """Split into padded batches; shuffled when a generator is given."""
    order = (torch.randperm(len(examples), generator=generator).tolist() if generator is not None
             else list(range(len(examples))))
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([examples[i] for i in chunk], pad_id) for chunk in chunks]
