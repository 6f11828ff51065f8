"""Compressed updates: bytes on the wire and held-out losses after a default federation per
wire format, and what one phone's upload is against the float32 model at 1.3B.

Runs `fedmilm-simulate` with `aggregation.upload=F aggregation.download=F` for F in fp32, fp16,
int8 (everything else the default run's), one after the other on the same machine. Then builds
the `milm-1.3b` adapter (LoRA r=8 on q/v, standard and FFA) and encodes one update of it in
each format with the phones' own encoder.

    python benchmarks/compressed_updates.py [--skip-federations] [hydra overrides...]
"""

from __future__ import annotations

import argparse

import torch
from _common import config, last_round, loss_cells, machine, write_section

from fedmilm.adapters import build_adapter_space, wire
from fedmilm.privacy.randomness import SecureRandom

FORMATS = ("fp32", "fp16", "int8")


def federations(overrides: list[str]) -> str:
    rows = {}
    for fmt in FORMATS:
        rows[fmt] = last_round([*overrides, f"aggregation.upload={fmt}",
                                f"aggregation.download={fmt}"])
        print(fmt, {k: rows[fmt][k] for k in ("loss_global", "bytes_up", "wall_s")}, flush=True)
    lines = [
        "## Compressed updates: a default federation per wire format",
        "",
        "Command: `python benchmarks/compressed_updates.py"
        + "".join(f" {o}" for o in overrides) + "` (the default federation: SmolLM2-135M, "
        "20 phones, 5 per round, 5 rounds, personalization=dual, no DP; upload and download in "
        f"the same format; one run per format, in sequence). Machine: {machine()}. Last "
        "round's held-out losses (in brackets: against fp32) and bytes per phone per round "
        "(`bytes_up` / phones aggregated, `bytes_down` / phones sampled).",
        "",
        "| format | base | base + global | base + global + personal | up per phone | down "
        "per phone | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    for fmt, row in rows.items():
        cells = loss_cells(row, rows["fp32"], is_reference=fmt == "fp32")
        up, down = row["bytes_up"] / row["clients"], row["bytes_down"] / row["sampled"]
        lines.append(f"| {fmt} | {' | '.join(cells)} | {up / 1e6:.3f} MB | "
                     f"{down / 1e6:.3f} MB | {row['wall_s']:.0f} |")
    return "\n".join(lines)


def upload_ratios() -> str:
    lines = [
        "## Compressed updates: one upload against the float32 model at `milm-1.3b`",
        "",
        "Command: `python benchmarks/compressed_updates.py` (the `milm-1.3b` config, LoRA r=8 on "
        "q_proj/v_proj; one synthetic update encoded by the phones' encoder, "
        "`ArrayRecord.count_bytes()`: what `bytes_up` counts, tensor names included). Goal: at "
        "most 1/3400 of the "
        "float32 model with int8 (1/6800 with FFA-LoRA).",
        "",
        "| LoRA | update | format | upload bytes | float32 model bytes | model / upload |",
        "|---|---|---|---|---|---|",
    ]
    for variant in ("standard", "ffa"):
        cfg = config(["model=milm-1.3b", f"lora.variant={variant}"])
        space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
        model_bytes = 4 * sum(p.numel() for n, p in space.model.named_parameters()
                              if "lora_" not in n)
        gen = torch.Generator().manual_seed(0)
        shapes = {k: space.initial[k].shape for k in space.global_keys}
        updates = {  # Adam moves every coordinate by about lr: flat codes that barely deflate
            "Gaussian": {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()},
            "uniform (Adam-like)": {k: (torch.rand(s, generator=gen) * 2 - 1) * 1e-3
                                    for k, s in shapes.items()}}
        for kind, update in updates.items():
            for fmt in FORMATS if kind == "Gaussian" else ("int8",):
                size = wire.encode(update, fmt, SecureRandom()).count_bytes()
                lines.append(f"| {variant} | {kind} | {fmt} | {size:,} | {model_bytes:,} | "
                             f"1/{model_bytes / size:,.0f} |")
        del space
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-federations", action="store_true")
    args, overrides = parser.parse_known_args()
    ratios = upload_ratios()
    write_section("compressed-upload-ratio", ratios)
    print(ratios, flush=True)
    if not args.skip_federations:
        table = federations(overrides)
        write_section("compressed-updates", table)
        print(table)


if __name__ == "__main__":
    main()
