"""Loss curves from ``metrics.jsonl`` (matplotlib is an optional extra, imported here only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics: str | os.PathLike | Sequence[str | os.PathLike], png: str | os.PathLike,
                 labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Training loss (raw and smoothed), eval loss and learning rate against steps, as a PNG.

    Several metrics files (e.g. pretraining then fine-tuning) become panels side by side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [metrics] if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    fig, axes = plt.subplots(1, len(paths), figsize=(6.5 * len(paths), 4.2), squeeze=False)
    for k, (path, ax) in enumerate(zip(paths, axes[0])):
        rows = read_metrics(path)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
            window = max(1, len(losses) // 50)
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=1.6, label=f"train loss (mean of {window})")
        if evals:
            ax.plot(*zip(*evals), "o-", color="tab:red", markersize=3, label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
        if lr:
            ax2 = ax.twinx()
            ax2.plot(*zip(*lr), color="tab:gray", linestyle="--", linewidth=0.8, label="lr")
            ax2.set_ylabel("learning rate", color="tab:gray")
            ax2.tick_params(axis="y", labelcolor="tab:gray")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(labels[k] if labels else (title or Path(path).parent.name))
    fig.tight_layout()
    out = Path(png)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
