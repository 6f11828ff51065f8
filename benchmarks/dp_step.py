"""DP-SGD overhead: one local step with Opacus vs without, per Opacus mode, side by side.

Modes: `none` (plain AdamW step), `hooks` (Opacus per-example gradients via module hooks, noise
from torch's generator), `hooks-csprng` (what `fedmilm.training.train_local` runs: hooks, noise
from the phone's CSPRNG, four normals per coordinate as in Opacus's secure mode), `functorch`
(per-example gradients via torch.func), `ghost` (ghost clipping: per-example norms without
per-example gradients, two backward passes).
Steps are interleaved across modes so machine noise hits all alike; medians are reported.

    python benchmarks/dp_step.py [--steps N] [--batch B] [--seq T] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import resource
import time

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

import torch  # noqa: E402
from _common import config, machine, median, write_section  # noqa: E402
from opacus import GradSampleModule  # noqa: E402
from opacus.grad_sample import GradSampleModuleFastGradientClipping  # noqa: E402
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping  # noqa: E402

from fedmilm.adapters import build_adapter_space  # noqa: E402
from fedmilm.data import IGNORE  # noqa: E402
from fedmilm.data.chat import Batch  # noqa: E402
from fedmilm.privacy.randomness import SecureRandom  # noqa: E402
from fedmilm.training import per_example_loss  # noqa: E402
from fedmilm.training.local import GivenNoiseDPOptimizer  # noqa: E402

MODES = ("none", "hooks", "hooks-csprng", "functorch", "ghost")


def make_step(mode: str, model: torch.nn.Module, params: list, batch: Batch, size: int):
    """A closure doing one optimizer step in `mode`."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if mode == "none":
        def step() -> None:
            per_example_loss(model, batch).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step, lambda: None
    dp_args = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=size)
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean")
        dp_opt = DPOptimizerFastGradientClipping(optimizer, **dp_args)
        criterion = DPLossFastGradientClipping(gsm, dp_opt, torch.nn.CrossEntropyLoss(
            reduction="mean", ignore_index=IGNORE), loss_reduction="mean")

        def step() -> None:
            logits = gsm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = criterion(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                             batch.labels[:, 1:].reshape(-1), shape=(size, logits.size(1) - 1))
            loss.backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
        return step, gsm._close
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                           force_functorch=mode == "functorch")
    csprng = SecureRandom() if mode == "hooks-csprng" else None
    dp_opt = (GivenNoiseDPOptimizer(optimizer, **dp_args) if csprng is not None
              else DPOptimizer(optimizer, **dp_args))

    def step() -> None:
        per_example_loss(gsm, batch).mean().backward()
        if csprng is not None:  # the skeleton's draw: one normal tensor per adapter tensor
            dp_opt.noise = [csprng.normal(p.shape, 1.0) for p in params]
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)
    return step, gsm._close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config(args.overrides)
    space = build_adapter_space(cfg.model, cfg.lora, mode="none", seed=0)
    model, params = space.model, space.trainable_parameters()
    model.train()
    ids = torch.randint(0, len(space.tokenizer), (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : args.seq // 2] = IGNORE  # loss on the second half, like an assistant reply
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    errors: dict[str, str] = {}
    for _ in range(args.steps + 1):  # the first round is a warm-up
        for mode in MODES:
            if mode in errors:
                continue
            step, close = make_step(mode, model, params, batch, args.batch)
            try:
                started = time.perf_counter()
                step()
                times[mode].append(time.perf_counter() - started)
            except Exception as err:  # noqa: BLE001 - a mode that fails is reported as such
                errors[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            finally:
                close()
    tokens = args.batch * args.seq
    base = median(times["none"][1:])
    rows = []
    for mode in MODES:
        if mode in errors:
            rows.append(f"| {mode} | fails: {errors[mode]} | - |")
        else:
            t = median(times[mode][1:])
            rows.append(f"| {mode} | {tokens / t:.1f} | {t / base:.2f} |")
    if not {"hooks", "hooks-csprng"} & set(errors):
        secure = median(times["hooks-csprng"][1:]) / median(times["hooks"][1:])
        rows.append(f"| CSPRNG noise vs torch noise (hooks-csprng / hooks) | - | {secure:.2f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    command = " ".join(["python benchmarks/dp_step.py", f"--steps {args.steps}",
                        f"--batch {args.batch}", f"--seq {args.seq}", *args.overrides])
    body = f"""## DP-SGD overhead, `{cfg.model.name}` (base {cfg.model.dtype})

Command: `{command}` (LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}, batch
{args.batch} x {args.seq} tokens, AdamW). Machine: {machine()}. Median of {args.steps}
interleaved steps per mode after one warm-up; peak RSS of the process {peak:.2f} GiB.
`hooks-csprng` is what fedmilm's phones run: Opacus hooks with the noise (and, in training, the
Poisson masks) from the phone's ChaCha20 CSPRNG, four normals per coordinate as in Opacus's
secure mode; `hooks` draws Opacus's default single normal from torch's generator.

| Opacus mode | tokens/s | time vs no DP |
|---|---|---|
{chr(10).join(rows)}
"""
    write_section(f"dp-step-{cfg.model.name}", body)
    print(body)


if __name__ == "__main__":
    main()
