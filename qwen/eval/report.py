"""Side-by-side reports of several ``qwen eval`` runs: one markdown table and a grouped bar chart.

Every task writes ``OUTPUT/results-TASK.json`` with at least ``task``, ``model`` and ``average`` (the
headline number in percent: accuracy, pass@1, action_right_rate). ``compare`` reads any number of those
files, e.g. one run per variant of a model (fp32 / GPTQ-Int4 / int8 / LoRA-merged) and several tasks per
run, and renders

- ``markdown``: one row per run (its label, by default its ``model`` field), one column per task, like
  the model cards' Int4-vs-BF16 table;
- ``bar_chart``: a PNG with one group of bars per task and one bar per run, values printed on the bars.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


class ReportError(ValueError):
    """A results file that cannot be compared (names the file)."""


@dataclass(frozen=True)
class RunScores:
    label: str
    scores: dict[str, float]  # task (with "-chat" for chat variants) -> average in percent


def task_key(result: dict[str, Any]) -> str:
    task = str(result["task"])
    if result.get("chat") and not task.endswith("-chat"):
        task += "-chat"
    return task


def load_results(paths: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> list[RunScores]:
    """Group results files into runs: files with the same label (default: their ``model`` field) form one run."""
    if labels is not None and len(labels) != len(paths):
        raise ReportError(f"{len(labels)} labels for {len(paths)} results files")
    runs: dict[str, dict[str, float]] = {}
    for i, p in enumerate(paths):
        try:
            result = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{p}: {e}") from e
        if not isinstance(result, dict) or "task" not in result or "average" not in result:
            raise ReportError(f"{p}: not a qwen eval results file (no 'task' / 'average')")
        if result["task"] == "ppl":
            raise ReportError(f"{p}: perplexity results have no single score; compare them with their tables")
        label = labels[i] if labels is not None else str(result.get("model", Path(p).parent.name))
        runs.setdefault(label, {})[task_key(result)] = float(result["average"])
    return [RunScores(label, scores) for label, scores in runs.items()]


def _tasks(runs: Sequence[RunScores]) -> list[str]:
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r.scores if t not in tasks]
    return tasks


def markdown(runs: Sequence[RunScores]) -> str:
    tasks = _tasks(runs)
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for r in runs:
        cells = [f"{r.scores[t]:.2f}" if t in r.scores and not math.isnan(r.scores[t]) else "" for t in tasks]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(runs: Sequence[RunScores], path: str | os.PathLike, title: str = "qwen eval") -> Path:
    """Grouped bars (tasks x runs) written to ``path`` as PNG (temp file + rename: never a partial file)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the comparison chart needs matplotlib: pip install matplotlib==3.11.2") from e
    tasks = _tasks(runs)
    if not tasks:
        raise ReportError("no scores to plot")
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(tasks) * (0.5 + 0.45 * len(runs))), 4.2))
    for j, r in enumerate(runs):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(tasks))]
        ys = [r.scores.get(t, math.nan) for t in tasks]
        bars = ax.bar(xs, [0 if math.isnan(y) else y for y in ys], width, label=r.label)
        for bar, y in zip(bars, ys):
            if not math.isnan(y):
                ax.annotate(f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("score (%)")
    top = max((y for r in runs for y in r.scores.values() if not math.isnan(y)), default=100.0)
    ax.set_ylim(0, max(10.0, min(100.0, top * 1.15 + 2)))
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["ReportError", "RunScores", "task_key", "load_results", "markdown", "bar_chart"]
