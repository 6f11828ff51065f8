"""Peak memory and speed of one phone's local training step at MiLM-1.3B scale.

Each configuration runs in a fresh process (peak RSS is per process): the phone builds the bf16
base, wraps it with LoRA and runs `fedmilm.training.train_local` (the one training loop) for one
warm-up and `--steps` measured steps. Rows: gradient checkpointing off/on x DP-SGD off/on at
micro-batch = batch = 2, then what the planner picks for `client.memory_budget_mb` with a
batch of 8. Each row also shows the planner's estimate, to check it stays above the measurement.

    python benchmarks/memory_budget.py [--steps N] [--budget-mb MB] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import torch  # noqa: E402
from _common import config, machine, median, run_child, write_section  # noqa: E402

from fedmilm.adapters import build_adapter_space  # noqa: E402
from fedmilm.data import IGNORE  # noqa: E402
from fedmilm.data.chat import Example  # noqa: E402
from fedmilm.privacy.randomness import private_random  # noqa: E402
from fedmilm.training import DpNoise, train_local  # noqa: E402
from fedmilm.training.memory import (  # noqa: E402
    estimate_peak_bytes,
    gradient_checkpointing,
    peak_bytes,
    plan_memory,
    reset_peak,
    resident_bytes,
)

GIB = 2**30


def _examples(count: int, seq: int, vocab: int) -> list[Example]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (seq,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE] * (seq // 2) + ids[seq // 2:]))
    return out


def child(args: argparse.Namespace, overrides: list[str]) -> None:
    """One configuration, in this process; prints one JSON line."""
    cfg = config(overrides)
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    model = space.model
    examples = _examples(args.batch * (args.steps + 1), args.seq, len(space.tokenizer))
    gc.collect()
    resident = resident_bytes()  # what the phone measures before planning
    if args.budget_mb is not None:
        plan = plan_memory(model, budget_mb=args.budget_mb, batch_size=args.batch,
                           seq_len=args.seq, micro_batch=None, checkpointing="auto", dp=args.dp,
                           resident=resident)
        micro, ckpt = plan.micro_batch, plan.checkpointing
    else:
        micro, ckpt = args.batch, args.checkpointing
    estimate = estimate_peak_bytes(model, micro_batch=micro, seq_len=args.seq,
                                   checkpointing=ckpt, dp=args.dp, resident=resident)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset_peak()  # from here on the peak is the training steps' (the base as it is held)
    times, tokens = [], []
    with gradient_checkpointing(model, ckpt):
        for step in range(args.steps + 1):
            chunk = examples[step * args.batch:(step + 1) * args.batch]
            dp = DpNoise(1.0, 1.0, private_random()) if args.dp else None
            stats = train_local(model, space.trainable_parameters(), chunk, epochs=1,
                                batch_size=args.batch, lr=1e-4, weight_decay=0.0,
                                pad_id=space.tokenizer.pad_token_id, seed=step, dp=dp,
                                micro_batch=micro)
            if step and stats.tokens:  # step 0 warms up
                times.append(stats.seconds)
                tokens.append(stats.tokens)
    print(json.dumps({"micro": micro, "checkpointing": ckpt, "dp": args.dp,
                      "rss": max(load_peak, peak_bytes()), "step_rss": peak_bytes(),
                      "load_rss": load_peak, "estimate": estimate,
                      "quantization": cfg.model.quantization,
                      "tokens_per_s": median([n / t for n, t in zip(tokens, times, strict=True)])}))


def _run(argv: list[str]) -> dict:
    return run_child(__file__, ["--child", *argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--budget-mb", type=float, default=None)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--dp", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--quantized", action="store_true",
                        help="compare model.quantization=none|int8|nf4 instead")
    args, overrides = parser.parse_known_args()
    overrides = overrides or ["model=milm-1.3b"]
    if args.child:
        child(args, overrides)
        return
    if args.quantized:
        quantized(args, overrides)
        return
    budget = args.budget_mb or 3584
    base = ["--steps", str(args.steps), "--seq", str(args.seq)]
    rows = []
    started = time.perf_counter()
    for ckpt in (False, True):
        for dp in (False, True):
            flags = [*base, "--batch", "2", *(["--checkpointing"] if ckpt else []),
                     *(["--dp"] if dp else [])]
            rows.append(("batch 2", _run([*flags, *overrides])))
            print(rows[-1], flush=True)
    for dp in (False, True):
        flags = [*base, "--batch", "8", "--budget-mb", str(budget), *(["--dp"] if dp else [])]
        rows.append((f"batch 8, budget {budget:g} MiB", _run([*flags, *overrides])))
        print(rows[-1], flush=True)
    lines = [
        "## Memory budget: one client step at `milm-1.3b` scale",
        "",
        f"Command: `python benchmarks/memory_budget.py --steps {args.steps} "
        f"{' '.join(overrides)}` (bf16 base built directly in bf16, LoRA r=8 on q_proj/v_proj "
        f"in fp32, {args.seq}-token rows, AdamW; DP = Opacus hooks, per-example clipping). "
        f"Machine: {machine()}. Each row is a fresh process: peak RSS is the whole process "
        f"(Python, libraries, weights, training). Tokens/s: median of {args.steps} steps after a "
        f"warm-up. Estimate: `fedmilm.training.memory.estimate_peak_bytes`, what the planner "
        f"compares with `client.memory_budget_mb`. Total {time.perf_counter() - started:.0f} s.",
        "",
        "| setting | micro-batch | checkpointing | DP | peak RSS GiB | estimate GiB | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['micro']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{'yes' if r['dp'] else 'no'} | {r['rss'] / GIB:.2f} | "
                     f"{r['estimate'] / GIB:.2f} | {r['tokens_per_s']:.1f} |")
    write_section("memory-budget-milm-1.3b", "\n".join(lines))
    print("\n".join(lines))


def quantized(args: argparse.Namespace, overrides: list[str]) -> None:
    """Rows: quantization x (checkpointing off without DP, on with DP) at batch 2."""
    rows = []
    started = time.perf_counter()
    for method in ("none", "int8", "nf4"):
        for ckpt, dp in ((False, False), (True, True)):
            flags = ["--steps", str(args.steps), "--seq", str(args.seq), "--batch", "2",
                     *(["--checkpointing"] if ckpt else []), *(["--dp"] if dp else [])]
            rows.append(_run([*flags, *overrides, f"model.quantization={method}"]))
            print(rows[-1], flush=True)
    lines = [
        "## Quantized frozen base: one client step at `milm-1.3b` scale",
        "",
        f"Command: `python benchmarks/memory_budget.py --quantized --steps {args.steps} "
        f"{' '.join(overrides)}` (base built in bf16, then its decoder linears quantized: int8 "
        f"weight-only per output channel or NF4, torchao; LoRA r=8 on q_proj/v_proj in fp32, "
        f"{args.seq}-token rows, batch 2, AdamW; DP = Opacus hooks). Machine: {machine()}. Each "
        "row is a fresh process. *Step peak*: the largest RSS while training (the process's "
        "peak mark is reset once the base is built), i.e. what a phone holding this base needs; "
        "*load peak*: building it here, where the bf16 base exists before it is quantized (a "
        "phone would receive the base already quantized). Tokens/s: median of "
        f"{args.steps} steps after a warm-up, side by side in one run. Total "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "| quantization | checkpointing | DP | step peak GiB | estimate GiB | load peak GiB "
        "| tokens/s | vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    speed = {(r["checkpointing"], r["dp"]): r["tokens_per_s"] for r in rows
             if r["quantization"] == "none"}
    for r in rows:
        lines.append(f"| {r['quantization']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{'yes' if r['dp'] else 'no'} | {r['step_rss'] / GIB:.2f} | "
                     f"{r['estimate'] / GIB:.2f} | {r['load_rss'] / GIB:.2f} | "
                     f"{r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / speed[(r['checkpointing'], r['dp'])]:.2f}x |")
    write_section("memory-budget-quantized", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
