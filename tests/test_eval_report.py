"""qwen eval --compare: runs side by side as a markdown table and a grouped bar chart (qwen/eval/report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen.commands import eval as eval_cmd
from qwen.eval import report


def _result(path: Path, task: str, average: float, model: str, chat: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": task, "model": model, "average": average, "chat": chat, "items": 10}))
    return path


def test_runs_are_grouped_by_label_and_tasks_become_columns(tmp_path: Path) -> None:
    files = [_result(tmp_path / "a" / "results-mmlu.json", "mmlu", 55.25, "fp32"),
             _result(tmp_path / "a" / "results-gsm8k-chat.json", "gsm8k", 40.0, "fp32", chat=True),
             _result(tmp_path / "b" / "results-mmlu.json", "mmlu", 54.5, "int4")]
    runs = report.load_results(files)
    assert [r.label for r in runs] == ["fp32", "int4"]
    assert runs[0].scores == {"mmlu": 55.25, "gsm8k-chat": 40.0}
    table = report.markdown(runs)
    assert table.splitlines()[0] == "| model | mmlu | gsm8k-chat |"
    assert "| fp32 | 55.25 | 40.00 |" in table and "| int4 | 54.50 |  |" in table
    relabelled = report.load_results(files, labels=["x", "x", "y"])
    assert [r.label for r in relabelled] == ["x", "y"]


def test_bar_chart_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [report.RunScores("fp32", {"mmlu": 55.0, "ceval": 60.0}), report.RunScores("int4", {"mmlu": 53.0})]
    out = report.bar_chart(runs, tmp_path / "charts" / "cmp.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(out.parent.glob(".*.tmp"))


def test_bad_results_files_are_named(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(report.ReportError, match="bad.json"):
        report.load_results([bad])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(report.ReportError, match="other.json: not a qwen eval results file"):
        report.load_results([other])
    with pytest.raises(report.ReportError, match="2 labels for 1"):
        report.load_results([other], labels=["a", "b"])
    assert eval_cmd.main(["--compare", str(bad)]) == 1
    assert "bad.json" in capsys.readouterr().err


def test_compare_command_writes_chart(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    a = _result(tmp_path / "a.json", "humaneval", 30.0, "bf16")
    b = _result(tmp_path / "b.json", "humaneval", 28.5, "int4")
    chart = tmp_path / "cmp.png"
    assert eval_cmd.main(["--compare", str(a), str(b), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "| bf16 | 30.00 |" in out and "| int4 | 28.50 |" in out
    assert chart.read_bytes()[:4] == b"\x89PNG"
