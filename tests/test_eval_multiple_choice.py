"""MMLU / C-Eval / CMMLU (qwen/eval/multiple_choice.py) against the official eval/ scripts' construction.

The expected prompts below were written by hand from the official evaluate_mmlu.py, evaluate_ceval.py
and evaluate_cmmlu.py (format_example, generate_few_shot_prompt), not produced by our code.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.commands import eval as eval_cmd
from qwen.eval import multiple_choice as mc


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


MMLU_DEV = [["What is 2 + 2?", "3", "4", "5", "6", "B"], ["Which is a prime?", "4", "6", "7", "9", "C"],
            ["Pick the even number.", "1", "3", "8", "9", "C"]]
MMLU_TEST = [["What is 3 + 4?", "7", "8", "6", "5", "A"], ["Square root of 81?", "7", "8", "10", "9", "D"],
             ["What is 10 / 2?", "2", "5", "10", "20", "B"]]


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    mmlu = tmp_path / "mmlu"
    for s in ("abstract_algebra", "anatomy"):
        _write(mmlu / "dev" / f"{s}_dev.csv", MMLU_DEV)
        _write(mmlu / "test" / f"{s}_test.csv", MMLU_TEST)
    ceval = tmp_path / "ceval"
    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for s in ("advanced_mathematics", "law"):
        _write(ceval / "dev" / f"{s}_dev.csv", [head, ["0", "1+1等于几？", "1", "2", "3", "4", "B", "1. 加法"],
                                                ["1", "中国的首都是？", "上海", "广州", "北京", "深圳", "C", ""]])
        _write(ceval / "val" / f"{s}_val.csv", [head[:7], ["0", "2+3等于几？", "5", "6", "7", "8", "A"],
                                                ["1", "一年有几个月？", "10", "11", "12", "13", "C"]])
    cmmlu = tmp_path / "cmmlu"
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    for s in ("ancient_chinese", "anatomy"):
        _write(cmmlu / "dev" / f"{s}.csv", [head, ["0", "太阳从哪边升起？", "东", "西", "南", "北", "A"]])
        _write(cmmlu / "test" / f"{s}.csv", [head, ["0", "水的化学式是？", "CO2", "H2O", "O2", "NaCl", "B"],
                                             ["1", "一周有几天？", "5", "6", "7", "8", "C"]])
    return {"mmlu": mmlu, "ceval": ceval, "cmmlu": cmmlu}


# ------------------------------------------------------------------------------------------ prompts
def test_mmlu_prompt_is_the_official_one(data) -> None:  # type: ignore[no-untyped-def]
    spec = mc.SPECS["mmlu"]
    dev = mc.read_items(spec, data["mmlu"] / "dev" / "abstract_algebra_dev.csv")
    test = mc.read_items(spec, data["mmlu"] / "test" / "abstract_algebra_test.csv")
    expected = ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                "Question: What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
                "Question: Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C\n\n"
                "Question: What is 3 + 4?\nA. 7\nB. 8\nC. 6\nD. 5\nAnswer:")
    assert mc.build_prompts(spec, "abstract_algebra", dev, test, shots=2)[0] == expected
    zero = mc.build_prompts(spec, "abstract_algebra", dev, test, shots=0)[1]
    assert zero == "Question: Square root of 81?\nA. 7\nB. 8\nC. 10\nD. 9\nAnswer:"  # no header without shots
    tok = AutoTokenizer.from_pretrained("qwen-demo")
    ids = mc.choice_token_ids(spec, tok)
    assert [tok.decode([i]) for i in ids] == [" A", " B", " C", " D"]


def test_ceval_and_cmmlu_prompts_are_the_official_ones(data) -> None:  # type: ignore[no-untyped-def]
    spec = mc.SPECS["ceval"]
    dev = mc.read_items(spec, data["ceval"] / "dev" / "law_dev.csv")
    val = mc.read_items(spec, data["ceval"] / "val" / "law_val.csv")
    assert mc.build_prompts(spec, "law", dev, val, shots=2)[1] == (
        "问题：1+1等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
        "问题：中国的首都是？\nA. 上海\nB. 广州\nC. 北京\nD. 深圳\n答案：C\n\n"
        "问题：一年有几个月？\nA. 10\nB. 11\nC. 12\nD. 13\n答案：")
    spec = mc.SPECS["cmmlu"]
    dev = mc.read_items(spec, data["cmmlu"] / "dev" / "anatomy.csv")
    test = mc.read_items(spec, data["cmmlu"] / "test" / "anatomy.csv")
    assert mc.build_prompts(spec, "anatomy", dev, test, shots=1)[0] == (
        "问题：太阳从哪边升起？\nA. 东\nB. 西\nC. 南\nD. 北\n答案：A\n\n"
        "问题：水的化学式是？\nA. CO2\nB. H2O\nC. O2\nD. NaCl\n答案：")
    tok = AutoTokenizer.from_pretrained("qwen-demo")
    assert [tok.decode([i]) for i in mc.choice_token_ids(spec, tok)] == ["A", "B", "C", "D"]


def test_cells_stay_text(tmp_path: Path) -> None:
    """pandas (the official reader) would turn '007' into 7 and an empty cell into 'nan'; we keep the text."""
    path = tmp_path / "test" / "x_test.csv"
    _write(path, [["Pick one", "007", "", "1.50", "True", "A"]])
    (item,) = mc.read_items(mc.SPECS["mmlu"], path)
    assert item.options == ("007", "", "1.50", "True")


def test_bad_data_names_the_file_and_row(tmp_path: Path) -> None:
    spec = mc.SPECS["ceval"]
    with pytest.raises(mc.EvalDataError, match=r"law_val\.csv: no such file"):
        mc.read_items(spec, tmp_path / "val" / "law_val.csv")
    bad = tmp_path / "val" / "law_val.csv"
    _write(bad, [["id", "question", "A", "B", "C", "D", "answer"], ["0", "q", "1", "2", "3", "4", "E"]])
    with pytest.raises(mc.EvalDataError, match=r"law_val\.csv: row 2: answer 'E' is not one of A, B, C, D"):
        mc.read_items(spec, bad)
    _write(bad, [["id", "question", "A", "B", "C", "answer"], ["0", "q", "1", "2", "3", "A"]])
    with pytest.raises(mc.EvalDataError, match=r"row 1: missing column\(s\) \['D'\]"):
        mc.read_items(spec, bad)
    _write(bad, [["id", "question", "A", "B", "C", "D", "answer"], ["0", "q", "1"]])
    with pytest.raises(mc.EvalDataError, match=r"row 2: 3 fields"):
        mc.read_items(spec, bad)


# -------------------------------------------------------------------------------------- aggregation
def _recs(correct: list[bool]) -> list[dict]:
    return [{"correct": c} for c in correct]


def test_mmlu_is_micro_averaged() -> None:
    # abstract_algebra (stem) 1/1, anatomy (stem) 1/3, philosophy (Humanities) 0/2:
    # micro = 2/6 = 33.33 (the macro mean would be (100 + 33.3 + 0) / 3 = 44.4)
    r = mc.aggregate("mmlu", {"abstract_algebra": _recs([True]), "anatomy": _recs([True, False, False]),
                              "philosophy": _recs([False, False])})
    assert r["average"] == pytest.approx(100 * 2 / 6)
    assert r["categories"] == {"stem": pytest.approx(50.0), "Humanities": 0.0}


def test_ceval_is_macro_averaged_with_categories_and_hard() -> None:
    # advanced_mathematics (STEM, hard) 1/2 = 50, college_physics (STEM, hard) 1/1 = 100, law (Humanities) 0/4 = 0
    r = mc.aggregate("ceval", {"advanced_mathematics": _recs([True, False]), "college_physics": _recs([True]),
                               "law": _recs([False] * 4)})
    assert r["average"] == pytest.approx(50.0)  # (50 + 100 + 0) / 3, not 2/7
    assert r["categories"] == {"STEM": pytest.approx(75.0), "Humanities": 0.0}
    assert r["hard"] == pytest.approx(75.0)


def test_cmmlu_counts_china_specific_subjects_in_two_categories() -> None:
    # ancient_chinese: Social Science (linguistics) and China specific; anatomy: STEM (biology)
    r = mc.aggregate("cmmlu", {"ancient_chinese": _recs([True, True]), "anatomy": _recs([False, True])})
    assert r["categories"] == {"STEM": 50.0, "Social Science": 100.0, "China specific": 100.0}
    assert r["average"] == pytest.approx(75.0)


def test_markdown_table_lists_runs_side_by_side() -> None:
    a = {"model": "fp32", "task": "ceval", "average": 50.0, "categories": {"STEM": 75.0}, "hard": 75.0}
    b = {"model": "int4", "task": "ceval", "average": 48.5, "categories": {"STEM": 70.0}, "hard": 71.0}
    table = mc.markdown_table([a, b])
    assert "| model | task | average | STEM | Hard |" in table
    assert "| fp32 | ceval | 50.00 | 75.00 | 75.00 |" in table and "| int4 | ceval | 48.50 | 70.00 | 71.00 |" in table


# ------------------------------------------------------------------------------------ on the model
@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    tok = AutoTokenizer.from_pretrained("qwen-demo")
    return AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval(), tok


def test_batched_scores_equal_single_ones(demo, data) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    spec = mc.SPECS["mmlu"]
    dev = mc.read_items(spec, data["mmlu"] / "dev" / "anatomy_dev.csv")
    test = mc.read_items(spec, data["mmlu"] / "test" / "anatomy_test.csv")
    prompts = mc.build_prompts(spec, "anatomy", dev, test, shots=3)  # unequal lengths: left padding
    ids = mc.choice_token_ids(spec, tok)
    batched = torch.tensor(mc.score_prompts(model, tok, prompts, ids))
    single = torch.tensor([mc.score_prompts(model, tok, [p], ids)[0] for p in prompts])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    assert torch.allclose(batched.sum(-1), torch.ones(3))
    # The same as scoring by hand: softmax of the last logits, the four choice tokens renormalised.
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(prompts[0])])).logits[0, -1].softmax(-1)[ids]
    torch.testing.assert_close(batched[0], logits / logits.sum(), atol=1e-5, rtol=0)
    # The shared few-shot prefix computed once (its KV cache reused per item) gives the same numbers.
    prefix = mc.few_shot_prefix(spec, "anatomy", dev, 3)
    cached = mc.score_with_prefix_cache(model, tok, prefix, [mc.format_item(spec, it, False) for it in test], ids)
    assert cached is not None
    torch.testing.assert_close(torch.tensor(cached), single, atol=1e-4, rtol=0)
    # Where the tokens at the seam would differ, it declines (and the caller uses whole prompts).
    assert mc.score_with_prefix_cache(model, tok, "Answer: B\n\nQuest", ["ion: x"], ids) is None


def test_run_writes_results_and_resumes(demo, data, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    out = tmp_path / "run"
    first = mc.run(model, tok, "ceval", data["ceval"], out, shots=2, batch_size=3, progress=False, model_label="demo",
                   subjects=["advanced_mathematics", "law"])
    assert first["items"] == 4 and set(first["subjects"]) == {"advanced_mathematics", "law"}
    saved = json.loads((out / "results-ceval.json").read_text())
    assert saved["average"] == pytest.approx(first["average"]) and "hard" in saved
    assert (out / "results-ceval.md").read_text().startswith("| model | task | average |")
    # An interrupted run: drop one cached item (and leave a torn line); the rerun scores only that one.
    cache = out / "items" / "ceval" / "2-shot" / "law.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][:10])
    calls = []
    real = mc.score_with_prefix_cache
    monkeypatch.setattr(mc, "score_with_prefix_cache",
                        lambda m, t, prefix, items, *a: calls.append(len(items)) or real(m, t, prefix, items, *a))
    again = mc.run(model, tok, "ceval", data["ceval"], out, shots=2, batch_size=3, progress=False,
                   subjects=["advanced_mathematics", "law"])
    assert calls == [1]
    assert again["subjects"] == first["subjects"]
    # Whole prompts in left-padded batches (--no-prefix-cache): the same predictions.
    plain = mc.run(model, tok, "ceval", data["ceval"], tmp_path / "plain", shots=2, batch_size=3, progress=False,
                   subjects=["advanced_mathematics", "law"], prefix_cache=False)
    assert plain["subjects"] == first["subjects"]


def test_eval_command(data, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cli"
    assert eval_cmd.main(["--model", "qwen-demo", "--task", "cmmlu", "--data", str(data["cmmlu"]), "--output", str(out),
                          "--subjects", "ancient_chinese", "anatomy", "--shots", "1", "--no-progress"]) == 0
    assert "| qwen-demo | cmmlu |" in capsys.readouterr().out
    assert eval_cmd.main(["--compare", str(out / "results-cmmlu.json"), str(out / "results-cmmlu.json")]) == 0
    assert capsys.readouterr().out.count("| qwen-demo | cmmlu |") == 2
    assert eval_cmd.main(["--model", "qwen-demo", "--task", "mmlu", "--data", str(tmp_path / "nowhere"),
                          "--output", str(out), "--no-progress"]) == 1
    assert "nowhere: not a directory" in capsys.readouterr().err
    assert eval_cmd.main(["--model", "qwen-demo", "--task", "mmlu", "--data", str(data["mmlu"]), "--output", str(out),
                          "--no-progress"]) == 1  # the fixture has 2 of the 57 subjects: the first missing file is named
    assert "mmlu/dev/astronomy_dev.csv: no such file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- perplexity
def test_perplexity_by_length_and_settings(demo, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Windows below seq_length: every setting gives the same number (alpha 1, LogN 1); beyond it NTK
    and LogN change the result; the value equals a hand computation on the full logits."""
    from qwen.bench.quant_accuracy import demo_texts
    from qwen.eval.perplexity import perplexity_by_length, window_nll

    model, tok = demo
    _, texts = demo_texts(tok)
    tokens = torch.cat(texts).tolist()
    seq = model.config.seq_length
    flags = (model.config.use_dynamic_ntk, model.config.use_logn_attn)
    short = perplexity_by_length(model, tokens, [64], windows=2, progress=False)
    values = list(short["perplexity"][s][64] for s in ("plain", "ntk", "ntk+logn"))
    assert values[0] == pytest.approx(values[1]) == pytest.approx(values[2])
    w = torch.tensor(tokens[:64])
    with torch.no_grad():
        logits = model(w[None]).logits[0, :-1].float()
    nll, n = window_nll(model, w)
    assert n == 63 and nll == pytest.approx(float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum")),
                                            rel=1e-5)
    long_len = seq + 256
    if len(tokens) >= long_len:
        long = perplexity_by_length(model, tokens, [long_len], windows=1, progress=False)["perplexity"]
        assert long["plain"][long_len] != pytest.approx(long["ntk"][long_len])
        assert long["ntk"][long_len] != pytest.approx(long["ntk+logn"][long_len])
    assert (model.config.use_dynamic_ntk, model.config.use_logn_attn) == flags  # restored after the runs
    text = tmp_path / "t.txt"
    text.write_text(tok.decode(tokens[:400]), encoding="utf-8")
    out = tmp_path / "ppl"
    assert eval_cmd.main(["--model", "qwen-demo", "--task", "ppl", "--data", str(text), "--lengths", "32", "64",
                          "--windows", "2", "--output", str(out), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("| setting | 32 | 64 |") and "| ntk+logn |" in shown
    saved = json.loads((out / "results-ppl.json").read_text())
    assert saved["windows"] == {"32": 2, "64": 2}
    assert eval_cmd.main(["--model", "qwen-demo", "--task", "ppl", "--data", str(text), "--lengths", "100000",
                          "--output", str(out), "--no-progress"]) == 1
    assert "not one window of 100000" in capsys.readouterr().err
