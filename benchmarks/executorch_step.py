"""ExecuTorch vs eager: export time and file sizes, then one local training step side by side.

Exports the configured model's phone programs (`fedmilm.export.export_bundle`, as
`fedmilm-export` does), then alternates one eager step (`train_local`: PyTorch + PEFT) and one
step through the exported programs (`train_with_programs`: ExecuTorch's runtime) on the same
batch and seed, and reports medians. Program loading (what a phone does once per round) is
timed separately from the step.

    python benchmarks/executorch_step.py [--reps N] [--batch B] [--dp] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import torch  # noqa: E402
from _common import config, machine, median, write_section  # noqa: E402

from fedmilm.adapters import build_adapter_space  # noqa: E402
from fedmilm.data import IGNORE  # noqa: E402
from fedmilm.data.chat import Example  # noqa: E402
from fedmilm.export import PhonePrograms, export_bundle, train_with_programs  # noqa: E402
from fedmilm.export.job import TrainJob  # noqa: E402
from fedmilm.export.ptd import adapter_to_ptd  # noqa: E402
from fedmilm.training import train_local  # noqa: E402

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dp", action="store_true", help="also export the DP-SGD program")
    args, overrides = parser.parse_known_args()
    cfg = config([*overrides, f"train.batch_size={args.batch}", "client.runtime=executorch"])
    seq = cfg.data.max_length
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    pad = space.tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        manifest, timings = export_bundle(space, cfg, Path(tmp) / "export", with_dp=args.dp)
        export_s = time.perf_counter() - started
        programs = PhonePrograms.load(Path(tmp) / "export")
    print(f"exported in {export_s:.0f} s: {timings}", flush=True)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch):
        ids = torch.randint(0, len(space.tokenizer), (seq,), generator=gen).tolist()
        examples.append(Example(ids, [IGNORE] * (seq // 2) + ids[seq // 2:]))
    state = space.initial_state(tuple(space.initial))
    job = TrainJob(epochs=1, batch_size=args.batch, sampling="shuffle",
                   noise_multiplier=None, max_grad_norm=None, seed=1)
    eager_s, device_s, load_s = [], [], []
    for rep in range(args.reps + 1):  # rep 0 warms both up
        space.load(state)
        stats = train_local(space.model, space.trainable_parameters(), examples, epochs=1,
                            batch_size=args.batch, lr=cfg.train.lr, weight_decay=0.0,
                            pad_id=pad, seed=1)
        called = time.perf_counter()
        _, result = train_with_programs(programs, adapter_to_ptd(manifest, state), examples,
                                        job)
        total = time.perf_counter() - called
        print(f"rep {rep}: eager {stats.seconds:.2f} s, ExecuTorch {result.seconds:.2f} s "
              f"(+{total - result.seconds:.2f} s loading)", flush=True)
        if rep:
            eager_s.append(stats.seconds)
            device_s.append(result.seconds)
            load_s.append(total - result.seconds)
    tokens = args.batch * seq
    lines = [
        f"## ExecuTorch vs eager, `{cfg.model.name}` (base {cfg.model.dtype})",
        "",
        f"Command: `python benchmarks/executorch_step.py --reps {args.reps} --batch {args.batch}"
        f"{' --dp' if args.dp else ''} {' '.join(overrides)}`. Machine: {machine()}. LoRA "
        f"r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}, one AdamW step on "
        f"{args.batch} x {seq} tokens; medians of {args.reps} alternating reps after a warm-up. "
        "ExecuTorch runs through its Python bindings (portable + optimized CPU kernels as "
        "shipped in the executorch 1.5.1 wheel, no XNNPACK delegation).",
        "",
        "| | step s | tokens/s | vs eager |",
        "|---|---|---|---|",
        f"| eager (PyTorch + PEFT) | {median(eager_s):.2f} | {tokens / median(eager_s):.0f} "
        "| 1.00 |",
        f"| ExecuTorch (train.pte + adamw.pte) | {median(device_s):.2f} | "
        f"{tokens / median(device_s):.0f} | {median(device_s) / median(eager_s):.2f} |",
        "",
        f"Loading the programs and the adapter `.ptd` per round: {median(load_s):.2f} s "
        f"(median). Export in {export_s:.0f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.seconds.items()) + ".",
        "",
        "| file | MiB |",
        "|---|---|",
        *[f"| {name} | {size / MIB:.2f} |" for name, size in timings.sizes.items()],
    ]
    write_section(f"executorch-step-{cfg.model.name}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
