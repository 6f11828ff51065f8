from __future__ import annotations

import pytest

from fedmilm.data import IGNORE, batches, encode, encode_all
from fedmilm.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_cfg):
    return load_tokenizer(tiny_cfg.model)


def _labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


@pytest.mark.parametrize("answer", ["Alarm set for 6:30 tomorrow.", "正在呼叫王丽（妈妈）。"])
def test_loss_only_on_assistant_tokens(tokenizer, answer):
    conv = [{"role": "user", "content": "wake me up"}, {"role": "assistant", "content": answer}]
    example = encode(tokenizer, conv, max_length=256)
    assert len(example.labels) == len(example.input_ids)
    assert _labelled_text(tokenizer, example) == answer + tokenizer.eos_token + "\n"
    assert "wake me up" not in _labelled_text(tokenizer, example)


def test_multi_turn_labels_every_assistant_turn(tokenizer):
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "A-one"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "A-two"}]
    text = _labelled_text(tokenizer, encode(tokenizer, conv, max_length=256))
    assert "A-one" in text and "A-two" in text and "q2" not in text


def test_truncation_and_fully_truncated_examples_are_dropped(tokenizer):
    conv = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]
    assert len(encode(tokenizer, conv, max_length=20).input_ids) == 20
    assert encode_all(tokenizer, [conv], max_length=20) == []


def test_batches_pad_and_shuffle_deterministically(tokenizer):
    import torch

    convs = [[{"role": "user", "content": "x" * i}, {"role": "assistant", "content": "y"}]
             for i in range(1, 6)]
    examples = encode_all(tokenizer, convs, max_length=64)
    out = batches(examples, batch_size=2, pad_id=tokenizer.pad_token_id,
                  generator=torch.Generator().manual_seed(0))
    again = batches(examples, batch_size=2, pad_id=tokenizer.pad_token_id,
                    generator=torch.Generator().manual_seed(0))
    assert [b.input_ids.shape[0] for b in out] == [2, 2, 1]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(out, again, strict=False))
    padded = torch.cat([b.labels[b.attention_mask == 0] for b in out])
    assert padded.numel() > 0 and (padded == IGNORE).all()
