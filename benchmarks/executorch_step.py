"""ExecuTorch vs eager: export time and file sizes, then one local training step side by side.

Exports the configured model's phone programs (`fedmilm.export.export_bundle`, as
`fedmilm-export` does), then alternates one eager step (`train_local`: PyTorch + PEFT) and one
step through the exported programs (`train_with_programs`: ExecuTorch's runtime) on the same
batch and seed, and reports medians. Program loading (what a phone does once per round) is
timed separately from the step.

Then profiles one step of each: the ExecuTorch train program with ETDump (ExecuTorch's own
per-operator timing, read with its Inspector) and the eager step with torch.profiler, and lists
the operators that take the most time in each.

    python benchmarks/executorch_step.py [--reps N] [--batch B] [--dp] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import torch  # noqa: E402
from _common import config, machine, median, write_section  # noqa: E402
from executorch.devtools import Inspector  # noqa: E402

from fedmilm.adapters import build_adapter_space  # noqa: E402
from fedmilm.data import IGNORE  # noqa: E402
from fedmilm.data.chat import Example, collate  # noqa: E402
from fedmilm.export import PhonePrograms, export_bundle, train_with_programs  # noqa: E402
from fedmilm.export.job import TrainJob  # noqa: E402
from fedmilm.export.ptd import adapter_to_ptd  # noqa: E402
from fedmilm.export.runtime import pad_to_program  # noqa: E402
from fedmilm.training import train_local  # noqa: E402

MIB = 2**20
TOP = 8
WRAPPERS = ("Method::execute", "Program::load_method", "OPERATOR_CALL")  # events around others


def profile_executorch(programs: PhonePrograms, examples: list[Example],
                       folder: Path) -> list[tuple[str, float]]:
    """(operator, ms) of one run of the train program, by ExecuTorch's ETDump, largest first."""
    manifest = programs.manifest
    pad = int(manifest.tokenizer["pad_token_id"])
    batch = pad_to_program(collate(examples[:manifest.micro_batch], pad),
                           rows=manifest.micro_batch, seq_len=manifest.seq_len, pad_id=pad)
    module = programs.separate_module("train", enable_etdump=True)
    adapter = [programs.initial[k] for k in manifest.peft_keys()]
    weights = torch.full((manifest.micro_batch,), 1.0 / manifest.micro_batch)
    module.run_method("forward", (*adapter, batch.input_ids, batch.attention_mask,
                                  batch.labels, weights))
    path = folder / "train.etdump"
    module.write_etdump_result_to_file(str(path))
    totals: dict[str, float] = collections.defaultdict(float)
    for block in Inspector(etdump_path=str(path)).event_blocks:
        for event in block.events:
            if event.perf_data is not None and event.name not in WRAPPERS:
                totals[event.name] += sum(event.perf_data.raw)
    return sorted(totals.items(), key=lambda kv: -kv[1])


def profile_eager(run_step) -> list[tuple[str, float]]:  # noqa: ANN001
    """(operator, ms) of one eager step by torch.profiler (self CPU time), largest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_step()
    rows = [(e.key, e.self_cpu_time_total / 1000) for e in prof.key_averages()]
    return sorted(rows, key=lambda kv: -kv[1])


def _top(rows: list[tuple[str, float]]) -> list[str]:
    total = sum(ms for _, ms in rows)
    return [f"{name} {ms / 1000:.2f} s ({100 * ms / total:.0f}%)" for name, ms in rows[:TOP]]


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
    tmp = tempfile.TemporaryDirectory()
    started = time.perf_counter()
    manifest, timings = export_bundle(space, cfg, Path(tmp.name) / "export", with_dp=args.dp)
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    programs = PhonePrograms.load(Path(tmp.name) / "export")
    for name in ("train", "adamw"):
        programs.module(name)
    load_s = time.perf_counter() - started  # once per phone process
    print(f"exported in {export_s:.0f} s: {timings}", flush=True)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch):
        ids = torch.randint(0, len(space.tokenizer), (seq,), generator=gen).tolist()
        examples.append(Example(ids, [IGNORE] * (seq // 2) + ids[seq // 2:]))
    state = space.initial_state(tuple(space.initial))
    job = TrainJob(epochs=1, batch_size=args.batch, sampling="shuffle",
                   noise_multiplier=None, max_grad_norm=None, seed=1)
    eager_s, device_s = [], []

    def eager_step():  # noqa: ANN202
        space.load(state)
        return train_local(space.model, space.trainable_parameters(), examples, epochs=1,
                           batch_size=args.batch, lr=cfg.train.lr, weight_decay=0.0,
                           pad_id=pad, seed=1)

    for rep in range(args.reps + 1):  # rep 0 warms both up
        stats = eager_step()
        _, result = train_with_programs(programs, adapter_to_ptd(manifest, state), examples,
                                        job)
        print(f"rep {rep}: eager {stats.seconds:.2f} s, ExecuTorch {result.seconds:.2f} s",
              flush=True)
        if rep:
            eager_s.append(stats.seconds)
            device_s.append(result.seconds)
    et_ops = profile_executorch(programs, examples, Path(tmp.name))
    eager_ops = profile_eager(eager_step)
    tmp.cleanup()
    tokens = args.batch * seq
    lines = [
        f"## ExecuTorch vs eager, `{cfg.model.name}` (base {cfg.model.dtype})",
        "",
        f"Command: `python benchmarks/executorch_step.py --reps {args.reps} --batch {args.batch}"
        f"{' --dp' if args.dp else ''} {' '.join(overrides)}`. Machine: {machine()}. LoRA "
        f"r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}, one AdamW step on "
        f"{args.batch} x {seq} tokens; medians of {args.reps} alternating reps after a warm-up. "
        "ExecuTorch runs through its Python bindings (the executorch 1.5.1 wheel's portable "
        "+ optimized CPU kernels"
        + ("; products and transposes delegated to XNNPACK)." if cfg.client.delegate ==
           "xnnpack" else "; no delegate)."),
        "",
        "| | step s | tokens/s | vs eager |",
        "|---|---|---|---|",
        f"| eager (PyTorch + PEFT) | {median(eager_s):.2f} | {tokens / median(eager_s):.0f} "
        "| 1.00 |",
        f"| ExecuTorch (train.pte + adamw.pte) | {median(device_s):.2f} | "
        f"{tokens / median(device_s):.0f} | {median(device_s) / median(eager_s):.2f} |",
        "",
        f"Reading and verifying the bundle and loading the programs (once per phone process): "
        f"{load_s:.2f} s. Export in {export_s:.0f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.seconds.items()) + ".",
        "",
        f"Where one step's time goes (top {TOP} operators; ExecuTorch: ETDump of one train.pte "
        "run over one micro-batch; eager: torch.profiler self time of one whole step):",
        "",
        "- ExecuTorch: " + "; ".join(_top(et_ops)),
        "- eager: " + "; ".join(_top(eager_ops)),
        "",
        "| file | MiB |",
        "|---|---|",
        *[f"| {name} | {size / MIB:.2f} |" for name, size in timings.sizes.items()],
    ]
    write_section(f"executorch-step-{cfg.model.name}-{cfg.client.delegate}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
