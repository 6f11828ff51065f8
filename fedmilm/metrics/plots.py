"""Pictures of a run: held-out loss per round and per-phone personal vs global loss."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # figures are never shown; free them at once
    return path


def _nan(values: list[float | None]) -> list[float]:
    """None (not measured) as NaN, which matplotlib leaves as a gap."""
    return [float("nan") if v is None else v for v in values]


def plot_losses(records: list[dict], path: Path) -> Path:
    """Mean held-out loss of base, base + global, base + global + personal, per round."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in records]
    for key, label in (("loss_base", "base"), ("loss_global", "base + global"),
                       ("loss_personal", "base + global + personal")):
        values = [r[key] for r in records]
        if any(v is not None for v in values):
            ax.plot(rounds, _nan(values), marker="o",
                    label=label)
    train = [r["train_loss"] for r in records]
    if any(v is not None for v in train):
        ax.plot(rounds, _nan(train), linestyle="--",
                color="grey", label="local training loss")
    ax.set(xlabel="round", ylabel="loss per assistant token", title="Held-out loss per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


BARS_UP_TO = 40  # phones; more are drawn as sorted curves, which stay readable at 1,000


def plot_clients(phones: list[dict], server_round: int, path: Path) -> Path:
    """Per phone after the last evaluated round: global vs personal held-out loss."""
    clients = sorted(phones, key=lambda c: c["loss_global"])
    personal = [c["loss_personal"] for c in clients]
    has_personal = any(p is not None for p in personal)
    xs = range(len(clients))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * min(len(clients), BARS_UP_TO)), 4))
    if len(clients) <= BARS_UP_TO:
        ax.bar([x - 0.2 for x in xs], [c["loss_global"] for c in clients], width=0.4,
               label="base + global")
        if has_personal:
            ax.bar([x + 0.2 for x in xs], _nan(personal),
                   width=0.4, label="base + global + personal")
        ax.set_xticks(list(xs), [str(i) for i in xs])
    else:
        ax.plot(xs, [c["loss_global"] for c in clients], label="base + global")
        if has_personal:
            ax.plot(xs, _nan(personal), ".", markersize=2, label="base + global + personal")
    ax.set(xlabel="phone (sorted by global loss)", ylabel="held-out loss",
           title=f"Per-phone held-out loss after round {server_round} ({len(clients)} phones)")
    ax.legend()
    return _save(fig, path)


def plot_privacy(records: list[dict], path: Path) -> Path:
    """Cumulative epsilon per round: user-level (against readers of the outputs, and against the
    server itself under distributed noise) and the worst phone's sample-level."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in records]
    for key, label in (("epsilon_user", "user-level, readers of the outputs"),
                       ("epsilon_server", "user-level, the server itself (phones' noise)"),
                       ("epsilon_sample_max", "sample-level, worst phone")):
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax.plot(rounds, _nan(values), marker="o",
                    label=label)
    delta = next((r["delta"] for r in records if r["delta"] is not None), None)
    accountant = next((r.get("accountant") for r in records if r.get("accountant")), "")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="epsilon",
           title=f"Privacy budget spent (delta={delta:g}, {accountant})" if delta else "epsilon")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_audit(results: dict[str, dict], path: Path) -> Path:
    """Canary exposure (global and personalised) and membership AUC per privacy mode."""
    modes = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(modes))
    for offset, key, label in ((-0.2, "exposure_global", "global model"),
                               (0.2, "exposure_personal", "personalised model")):
        means = [sum(results[m][key]) / len(results[m][key]) for m in modes]
        left.bar([x + offset for x in xs], means, width=0.4, label=label)
    left.set_xticks(list(xs), modes)
    left.set(xlabel="privacy mode", ylabel="exposure (bits, mean over canaries)",
             title="Canary exposure")
    left.legend()
    for offset, key, label in ((-0.2, "auc_global", "global model"),
                               (0.2, "auc_personal", "personalised model")):
        values = _nan([results[m][key] for m in modes])
        right.bar([x + offset for x in xs], values, width=0.4, label=label)
    right.axhline(0.5, color="grey", linestyle="--", label="chance")
    right.set_xticks(list(xs), modes)
    right.set(xlabel="privacy mode", ylabel="AUC", title="Membership inference (loss)",
              ylim=(0.0, 1.0))
    right.legend()
    return _save(fig, path)


def plot_tradeoff(points: list[dict], path: Path) -> Path:
    """Final held-out loss against claimed epsilon, one marker per run (user-level epsilon
    where present, otherwise the worst phone's sample-level epsilon)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [p["epsilon_user"] if p["epsilon_user"] is not None else p["epsilon_sample_max"]
           for p in points]
    for key, label in (("loss_global", "base + global"),
                       ("loss_personal", "base + global + personal")):
        pairs = sorted((e, p[key]) for e, p in zip(eps, points, strict=True)
                       if p[key] is not None)
        if pairs:
            ax.plot([e for e, _ in pairs], [v for _, v in pairs], marker="o", label=label)
    ax.set(xlabel="epsilon (user-level if on, else worst phone's sample-level)",
           ylabel="final held-out loss", title="Privacy-utility trade-off", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
