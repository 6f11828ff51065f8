"""Tokens/s of one local training step: fedmilm's loop against a bare PEFT loop.

Both train the same LoRA setup on the same batches of the same phone's data; the bare loop is
the textbook `get_peft_model` + AdamW + `model(..., labels=...).loss`. Steps are interleaved
(ours, bare, ours, ...) so machine noise hits both alike; the medians are reported.

    python benchmarks/train_step.py [--steps N] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import time

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import torch  # noqa: E402
from _common import config, machine, median, write_section  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from fedmilm.adapters import build_adapter_space  # noqa: E402
from fedmilm.data import batches, encode_all, load_user  # noqa: E402
from fedmilm.model import load_base_model  # noqa: E402
from fedmilm.training import train_local  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config(args.overrides)
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
    data = load_user(cfg.data, user=0, seed=cfg.seed)
    examples = encode_all(space.tokenizer, data.train, cfg.data.max_length)[: cfg.train.batch_size]
    batch = batches(examples, batch_size=cfg.train.batch_size,
                    pad_id=space.tokenizer.pad_token_id)[0]
    tokens = int(batch.attention_mask.sum())

    bare = get_peft_model(load_base_model(cfg.model, space.tokenizer, cfg.seed),
                          LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                     lora_dropout=cfg.lora.dropout,
                                     target_modules=list(cfg.lora.target_modules),
                                     task_type="CAUSAL_LM"))
    bare_opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=cfg.train.lr)
    bare.train()

    def bare_step() -> float:
        started = time.perf_counter()
        loss = bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    labels=batch.labels).loss
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def ours_step() -> float:
        stats = train_local(space.model, space.trainable_parameters(), examples, epochs=1,
                            batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay,
                            pad_id=space.tokenizer.pad_token_id, seed=0)
        assert stats.steps == 1
        return stats.seconds

    ours_step(), bare_step()  # warm-up
    ours, bare_times = [], []
    for _ in range(args.steps):
        ours.append(ours_step())
        bare_times.append(bare_step())
    ours_tps, bare_tps = tokens / median(ours), tokens / median(bare_times)
    command = " ".join(["python benchmarks/train_step.py", f"--steps {args.steps}",
                        *args.overrides])
    body = f"""## One local training step (tokens/s)

Command: `{command}` (model `{cfg.model.name}`, base {cfg.model.dtype}, LoRA r={cfg.lora.r} on
{', '.join(cfg.lora.target_modules)}, one batch of {cfg.train.batch_size} interactions =
{tokens} tokens). Machine: {machine()}. Median of {args.steps} interleaved steps each.

| loop | tokens/s | ratio |
|---|---|---|
| bare PEFT loop (`labels=` loss, AdamW) | {bare_tps:.0f} | 1.00 |
| fedmilm `train_local` | {ours_tps:.0f} | {ours_tps / bare_tps:.2f} |
"""
    write_section(f"train-step-{cfg.model.name}", body)
    print(body)


if __name__ == "__main__":
    main()
