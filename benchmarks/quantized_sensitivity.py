"""Which layers NF4 hurts: the base model's held-out loss with NF4 everywhere, with one kind of
projection kept in int8 instead, and with QLoRA's 64-weight blocks halved.

No training: the frozen base alone (LoRA disabled) on the held-out data of the first `--users`
users of the default config, so each variant costs one evaluation.

    python benchmarks/quantized_sensitivity.py [--users N] [hydra overrides...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

from _common import config, machine, write_section  # noqa: E402

import fedmilm.model.quantize as quantize  # noqa: E402
from fedmilm.adapters import build_adapter_space  # noqa: E402
from fedmilm.data import encode_all, load_user  # noqa: E402
from fedmilm.data.chat import batches  # noqa: E402
from fedmilm.training.loss import mean_loss  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6)
    args, overrides = parser.parse_known_args()
    cfg = config([*overrides, "model.quantization=none"])

    def base_loss(method_of: Callable[[str], str] | None) -> float:
        space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=cfg.seed)
        model = space.model
        if method_of is not None:
            for name in [n for n, m in model.named_modules() if quantize.quantizable(n, m)]:
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent)
                setattr(owner, child, quantize.QuantizedLinear(getattr(owner, child),
                                                               method_of(name)))
        held = []
        for user in range(args.users):
            data = load_user(cfg.data, user=user, seed=cfg.seed)
            held += encode_all(space.tokenizer, data.heldout, cfg.data.max_length)
        with model.disable_adapter():
            return mean_loss(model, batches(held, batch_size=8,
                                            pad_id=space.tokenizer.pad_token_id))

    rows = [("none (bf16)", base_loss(None)), ("int8 everywhere", base_loss(lambda n: "int8")),
            ("NF4 everywhere", base_loss(lambda n: "nf4"))]
    for kind in KINDS:
        rows.append((f"NF4, {kind} in int8",
                     base_loss(lambda n, k=kind: "int8" if f".{k}." in f"{n}." else "nf4")))
    block = quantize.NF4_BLOCK
    quantize.NF4_BLOCK = block // 2
    rows.append((f"NF4 with {block // 2}-weight blocks", base_loss(lambda n: "nf4")))
    quantize.NF4_BLOCK = block
    reference = rows[0][1]
    lines = [
        f"## Which layers NF4 hurts: `{cfg.model.name}` base, held-out loss",
        "",
        f"Command: `python benchmarks/quantized_sensitivity.py --users {args.users}"
        + "".join(f" {o}" for o in overrides) + f"`. Machine: {machine()}. The frozen base "
        f"alone (no adapter) on the held-out data of {args.users} users; one evaluation per "
        "variant.",
        "",
        "| variant | held-out loss | vs bf16 |",
        "|---|---|---|",
        *[f"| {name} | {loss:.4f} | {loss / reference - 1:+.1%} |" for name, loss in rows],
    ]
    write_section(f"quantized-sensitivity-{cfg.model.name}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
