"""A phone that runs only ExecuTorch: export time and sizes, then one training step and one
evaluation in a fresh process that never builds the eager model, with its peak memory.

1. Export (`fedmilm.export.export_bundle`, as `fedmilm-export` does) in its own process: time,
   file sizes, the exporter's peak RSS.
2. The phone, in a fresh process: read and verify the bundle, one training step on a batch
   (`train_with_programs`), one held-out evaluation (`heldout_loss`), reporting the process's
   peak RSS (everything a phone process holds: Python, the ExecuTorch runtime, the base, the
   step) and tokens/s of each, medians of `--steps` after a warm-up.

    python benchmarks/executorch_phone.py [--steps N] [--batch B] [hydra overrides...]
    python benchmarks/executorch_phone.py model=milm-1.3b model.quantization=int8 \
        model.dtype=float32 data.max_length=128
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import torch  # noqa: E402
from _common import config, machine, median, run_child, write_section  # noqa: E402

GIB, MIB = 2**30, 2**20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _config(args: argparse.Namespace, overrides: list[str]):  # noqa: ANN202
    return config([*overrides, f"train.batch_size={args.batch}",
                   f"client.micro_batch={args.micro or args.batch}", "client.runtime=executorch",
                   "personalization=none"])


def export_child(args: argparse.Namespace, overrides: list[str]) -> None:
    """Build the base, export the bundle into `args.folder`; one JSON line."""
    from fedmilm.adapters import build_adapter_space
    from fedmilm.export import export_bundle

    cfg = _config(args, overrides)
    started = time.perf_counter()
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    _, timings = export_bundle(space, cfg, Path(args.folder), with_dp=False)
    print(json.dumps({"build_s": build_s, "export_s": time.perf_counter() - started,
                      "stages": timings.seconds, "sizes": timings.sizes,
                      "planned": timings.planned,
                      "peak_rss": _peak_rss()}))


def phone_child(args: argparse.Namespace, overrides: list[str]) -> None:
    """What a phone process does with the bundle; one JSON line. No eager model is built."""
    from fedmilm.data import IGNORE
    from fedmilm.data.chat import Example
    from fedmilm.export.job import TrainJob
    from fedmilm.export.ptd import adapter_to_ptd
    from fedmilm.export.runtime import PhonePrograms, heldout_loss, train_with_programs

    cfg = _config(args, overrides)
    started = time.perf_counter()
    programs = PhonePrograms.load(Path(args.folder))
    load_s = time.perf_counter() - started
    manifest, seq = programs.manifest, cfg.data.max_length
    vocab = int(manifest.tokenizer["vocab_size"])
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch * (args.steps + 1)):
        ids = torch.randint(0, vocab, (seq,), generator=gen).tolist()
        examples.append(Example(ids, [IGNORE] * (seq // 2) + ids[seq // 2:]))
    job = TrainJob(epochs=1, batch_size=args.batch, sampling="shuffle", noise_multiplier=None,
                   max_grad_norm=None, seed=1)
    adapter = adapter_to_ptd(manifest, programs.initial)
    chunks = [examples[step * args.batch:(step + 1) * args.batch]
              for step in range(args.steps + 1)]  # the first warms up
    train_s = [train_with_programs(programs, adapter, chunk, job)[1].seconds
               for chunk in chunks][1:]
    eval_s = []  # then evaluation, as in a round (the train program's memory is released)
    for chunk in chunks:
        started = time.perf_counter()
        heldout_loss(programs, programs.initial, chunk)
        eval_s.append(time.perf_counter() - started)
    eval_s = eval_s[1:]
    tokens = args.batch * seq
    print(json.dumps({"load_s": load_s, "train_tps": tokens / median(train_s),
                      "eval_tps": tokens / median(eval_s), "peak_rss": _peak_rss()}))


def _run(kind: str, argv: list[str]) -> dict:
    return run_child(__file__, [f"--{kind}", *argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--micro", type=int, default=None, help="micro-batch (default: batch)")
    parser.add_argument("--folder", default=None)
    parser.add_argument("--export-child", action="store_true")
    parser.add_argument("--phone-child", action="store_true")
    args, overrides = parser.parse_known_args()
    if args.export_child:
        export_child(args, overrides)
        return
    if args.phone_child:
        phone_child(args, overrides)
        return
    cfg = _config(args, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--steps", str(args.steps), "--batch", str(args.batch), "--folder",
                 str(Path(tmp) / "bundle"), *(["--micro", str(args.micro)] if args.micro else [])]
        exported = _run("export-child", [*flags, *overrides])
        print(exported, flush=True)
        phone = _run("phone-child", [*flags, *overrides])
        print(phone, flush=True)
    quant = cfg.model.quantization
    micro, delegate = cfg.client.micro_batch, cfg.client.delegate
    name = f"executorch-phone-{cfg.model.name}-{quant}-{delegate}-micro{micro}"
    lines = [
        f"## A phone on ExecuTorch only: `{cfg.model.name}`, base {cfg.model.dtype}, "
        f"quantization {quant}, delegate {delegate}, micro-batch {micro}",
        "",
        f"Command: `python benchmarks/executorch_phone.py --steps {args.steps} --batch "
        f"{args.batch}{f' --micro {args.micro}' if args.micro else ''} {' '.join(overrides)}`. "
        f"Machine: {machine()}. LoRA r={cfg.lora.r} on "
        f"{', '.join(cfg.lora.target_modules)}; {args.batch} x {cfg.data.max_length} tokens per "
        "step; the phone is a fresh process that never builds the eager model; medians of "
        f"{args.steps} steps after a warm-up, then as many evaluations (the train program "
        "released first, as in a round).",
        "",
        f"- Export: {exported['export_s']:.0f} s (building the base first: "
        f"{exported['build_s']:.0f} s), exporter peak RSS {exported['peak_rss'] / GIB:.2f} GiB; "
        "stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in exported["stages"].items()) + ".",
        "- Files: " + ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in exported["sizes"].items())
        + ". Working memory ExecuTorch planned per program (allocated at load): "
        + ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in exported["planned"].items()) + ".",
        f"- Phone: reading and verifying the bundle {phone['load_s']:.1f} s; training "
        f"{phone['train_tps']:.1f} tokens/s, evaluation {phone['eval_tps']:.1f} tokens/s; "
        f"**peak RSS {phone['peak_rss'] / GIB:.2f} GiB** (the whole phone process).",
    ]
    write_section(name, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
