"""Held-out losses after a default federation with a quantized frozen base.

Runs `fedmilm-simulate` with `model.quantization=none|int8|nf4` (everything else the default
run's), one after the other on the same machine, and reports the last round's held-out losses
of base, base + global and base + global + personal, each against the unquantized run.

    python benchmarks/quantized_quality.py [hydra overrides...]
"""

from __future__ import annotations

import sys

from _common import LOSSES, last_round, loss_cells, machine, write_section

METHODS = ("none", "int8", "nf4")


def main() -> None:
    overrides = sys.argv[1:]
    rows = {}
    for method in METHODS:
        rows[method] = last_round([*overrides, f"model.quantization={method}"])
        print(method, {k: rows[method][k] for k in (*LOSSES, "wall_s")}, flush=True)
    reference = rows["none"]
    lines = [
        "## Quantized frozen base: held-out losses after a default federation",
        "",
        "Command: `python benchmarks/quantized_quality.py"
        + "".join(f" {o}" for o in overrides) + "` (the default federation: SmolLM2-135M, "
        "20 phones, 5 per round, 5 rounds, personalization=dual, no DP; one run per "
        f"quantization, in sequence). Machine: {machine()}. Last round's held-out losses; in "
        "brackets the change against `none` (the bf16 base).",
        "",
        "| quantization | base | base + global | base + global + personal | run s |",
        "|---|---|---|---|---|",
    ]
    for method, row in rows.items():
        cells = loss_cells(row, reference, is_reference=method == "none")
        lines.append(f"| {method} | {' | '.join(cells)} | {row['wall_s']:.0f} |")
    write_section("quantized-quality", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
