"""Chat MMLU / C-Eval / CMMLU (qwen/eval/chat_choice.py) against the official evaluate_chat_mmlu.py and
evaluate_chat_ceval.py.

The expected queries and the expected letter of every reply in the tables were worked out by hand from
the official scripts (format_example, process_before_extraction, the regex order of extract_choice, the
thefuzz fallback), not produced by our code. CMMLU has no official chat script: it is checked against
the C-Eval construction it is defined by.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.chat import chat
from qwen.eval import chat_choice as cc
from qwen.eval import generation
from qwen.eval.multiple_choice import Item


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    mmlu = tmp_path / "mmlu"
    _write(mmlu / "test" / "abstract_algebra_test.csv",
           [["What is 3 + 4?", "7", "8", "6", "5", "A"], ["Square root of 81?", "7", "8", "10", "9", "D"],
            ["What is 10 / 2?", "2", "5", "10", "20", "B"]])
    _write(mmlu / "test" / "anatomy_test.csv",
           [["Which bone is in the arm?", "Femur", "Humerus", "Tibia", "Fibula", "B"],
            ["How many chambers has the human heart?", "Two", "Three", "Four", "Five", "C"]])
    ceval = tmp_path / "ceval"
    head = ["id", "question", "A", "B", "C", "D", "answer"]
    _write(ceval / "val" / "advanced_mathematics_val.csv",
           [head, ["0", "2+3等于几？", "5", "6", "7", "8", "A"], ["1", "一年有几个月？", "10", "11", "12", "13", "C"]])
    _write(ceval / "val" / "law_val.csv",
           [head, ["0", "中国的首都是哪里？", "上海", "北京", "广州", "深圳", "B"],
            ["1", "宪法是国家的____。", "根本大法", "普通法律", "行政法规", "地方法规", "A"]])
    cmmlu = tmp_path / "cmmlu"
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    _write(cmmlu / "test" / "anatomy.csv",
           [head, ["0", "水的化学式是？", "CO2", "H2O", "O2", "NaCl", "B"], ["1", "一周有几天？", "5", "6", "7", "8", "C"]])
    _write(cmmlu / "test" / "ancient_chinese.csv", [head, ["0", "“三人行”的下一句是？", "必有我师", "择善而从", "学而时习", "温故知新", "A"]])
    return {"mmlu": mmlu, "ceval": ceval, "cmmlu": cmmlu}


# ------------------------------------------------------------------------------------------ queries
def test_mmlu_query_is_the_official_one() -> None:
    item = Item("What is the capital of France?", ("Paris", "London", "Berlin", "Madrid"), "A")
    assert cc.chat_query("mmlu", item) == (
        "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
        "as the answer to this question.\n\n"
        "What is the capital of France?\nA. Paris\nB. London\nC. Berlin\nD. Madrid\n")


def test_ceval_query_is_the_official_one_and_cmmlu_follows_it() -> None:
    item = Item("关于传输层的面向连接服务的特性是____。",
                ("既不保证可靠，也不保证按序交付", "不保证可靠，但保证按序交付", "保证可靠，但不保证按序交付", "既保证可靠，也保证按序交付"), "C")
    assert cc.chat_query("ceval", item) == (
        "关于传输层的面向连接服务的特性是____。\n\nA. 既不保证可靠，也不保证按序交付\nB. 不保证可靠，但保证按序交付\n"
        "C. 保证可靠，但不保证按序交付\nD. 既保证可靠，也保证按序交付\n")
    water = Item("水的化学式是？", ("CO2", "H2O", "O2", "NaCl"), "B")
    assert cc.chat_query("cmmlu", water) == "水的化学式是？\n\nA. CO2\nB. H2O\nC. O2\nD. NaCl\n"
    with pytest.raises(ValueError, match="task must be one of"):
        cc.chat_query("gsm8k", water)


# ------------------------------------------------------------------------------------- extraction
CAPITALS = ("Paris", "London", "Berlin", "Madrid")
DIGITS = ("1", "2", "3", "4")
CELL = ("the mitochondria", "the nucleus", "the ribosome", "the cell membrane")

# (reply, options, expected letter, rule that decides), each worked out by hand from the official cascade.
MMLU_CASES = [
    ("The answer is B.", CAPITALS, "B", "answer-cue"),
    ("Answer: C", CAPITALS, "C", "answer-cue"),
    ("I choose C.", CAPITALS, "C", "answer-cue"),
    ("Choice B is right because the others are wrong.", CAPITALS, "B", "answer-cue"),
    ("The correct answer is (A) Paris.", CAPITALS, "A", "answer-cue"),
    ("The answer is C. B and D are wrong.", CAPITALS, "C", "answer-cue"),  # several letters: the cue wins
    ("The answer is 3.", DIGITS, "C", "answer-cue"),  # option text "3" rewritten to C first
    ("2 + 2 = 4, so the answer is D.", ("3", "4", "5", "6"), "D", "answer-cue"),  # "4" -> B, but the cue says D
    ("A is correct.", CAPITALS, "A", "is-correct"),
    ("B is not correct, D is correct.", CAPITALS, "D", "is-correct"),  # negated "B is not correct" skipped
    ("The answer isn't B; C is right.", CAPITALS, "C", "is-correct"),  # negated cue skipped
    ("B", CAPITALS, "B", "leading-letter"),
    ("D.", CAPITALS, "D", "leading-letter"),
    ("A, B, or C? I'd say D.", CAPITALS, "A", "leading-letter"),  # several letters: the leading one
    ("London", CAPITALS, "B", "leading-letter"),  # the option text alone: rewritten to its letter
    ("it is paris", ("It is Paris.", "It is Rome.", "It is Oslo.", "It is Bern."), "A", "leading-letter"),
    ("New York", ("New York", "York", "Boston", "Chicago"), "A", "leading-letter"),  # longest option first
    ("I think (D) because the other options are wrong.", CAPITALS, "D", "first-letter"),
    ("The answer is not A, it is C.", CAPITALS, "A", "first-letter"),  # negated cue; then the first letter
    ("The capital of France is paris.", CAPITALS, "A", "first-letter"),  # case-insensitive rewrite
    ("A careful reading shows that Berlin is wrong.", CAPITALS, "A", "first-letter"),  # the article "A"
    ("Option D: Madrid", CAPITALS, "D", "first-letter"),
    ("It's the mitochondrion, the powerhouse of the cell.", CELL, "A", "fuzzy"),
    ("", CAPITALS, "A", "fuzzy"),  # empty reply: every score 0, the first option
]

TRANSPORT_Q = "关于传输层的面向连接服务的特性是____。"
TRANSPORT = ("既不保证可靠，也不保证按序交付", "不保证可靠，但保证按序交付", "保证可靠，但不保证按序交付", "既保证可靠，也保证按序交付")
CAPITAL_Q, CAPITAL = "我国的首都是____，它位于华北平原。", ("上海", "北京", "广州", "深圳")
WATER_Q, WATER = "水的化学式是？", ("CO2", "H2O", "O2", "NaCl")

# (reply, question, options, expected letter, rule)
CEVAL_CASES = [
    ("关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付", TRANSPORT_Q, TRANSPORT, "D", "answer-cue"),
    ("答案是：C", TRANSPORT_Q, TRANSPORT, "C", "answer-cue"),
    ("我认为应该选B。", TRANSPORT_Q, TRANSPORT, "B", "answer-cue"),
    ("A和B都不对，正确答案是C", TRANSPORT_Q, TRANSPORT, "C", "answer-cue"),
    ("正确答案为：B", TRANSPORT_Q, TRANSPORT, "B", "answer-cue"),
    ("答案是AB", TRANSPORT_Q, TRANSPORT, "A", "answer-cue"),  # several letters: the first after the cue
    ("我国的首都是北京，它位于华北平原。", CAPITAL_Q, CAPITAL, "B", "answer-cue"),  # stem -> 答案是, tail dropped
    ("我选C", WATER_Q, WATER, "C", "answer-cue"),
    ("选项A正确", TRANSPORT_Q, TRANSPORT, "A", "is-correct"),
    ("B选项符合题意", TRANSPORT_Q, TRANSPORT, "B", "is-correct"),
    ("A不正确，B正确", TRANSPORT_Q, TRANSPORT, "B", "is-correct"),  # negated "A不正确" skipped
    ("B", TRANSPORT_Q, TRANSPORT, "B", "leading-letter"),
    ("（C）", TRANSPORT_Q, TRANSPORT, "C", "leading-letter"),
    ("D. 既保证可靠，也保证按序交付", TRANSPORT_Q, TRANSPORT, "D", "leading-letter"),
    ("保证可靠，但不保证按序交付", TRANSPORT_Q, TRANSPORT, "C", "leading-letter"),  # option text alone
    ("水的化学式是H2O。", WATER_Q, WATER, "B", "first-letter"),  # stem "水的化学式是？" absent (no ？); H2O -> B
    ("答案不是A，而是D。", TRANSPORT_Q, TRANSPORT, "A", "first-letter"),  # negated cue; then the first letter
    ("The answer is B.", TRANSPORT_Q, TRANSPORT, "B", "first-letter"),  # no Chinese cue
    ("面向连接的服务既保证可靠又保证按序交付", TRANSPORT_Q, TRANSPORT, "D", "fuzzy"),
    ("", TRANSPORT_Q, TRANSPORT, "A", "fuzzy"),
]


@pytest.mark.parametrize("reply,options,letter,rule", MMLU_CASES)
def test_mmlu_extraction(reply: str, options: tuple[str, ...], letter: str, rule: str) -> None:
    if rule == "fuzzy":
        pytest.importorskip("thefuzz")
    ex = cc.extract_mmlu(reply, options)
    assert (ex.letter, ex.rule) == (letter, rule)
    assert cc.extract_choice_mmlu(reply, options) == letter
    assert cc.extract("mmlu", reply, Item("q", options, None)).letter == letter  # type: ignore[arg-type]


@pytest.mark.parametrize("reply,question,options,letter,rule", CEVAL_CASES)
def test_ceval_and_cmmlu_extraction(reply: str, question: str, options: tuple[str, ...], letter: str,
                                    rule: str) -> None:
    if rule == "fuzzy":
        pytest.importorskip("thefuzz")
    ex = cc.extract_ceval(reply, question, options)
    assert (ex.letter, ex.rule) == (letter, rule)
    assert cc.extract_choice_ceval(reply, question, options) == letter
    assert cc.extract_choice_cmmlu(reply, question, options) == letter
    assert cc.extract("cmmlu", reply, Item(question, options, None)).letter == letter  # type: ignore[arg-type]


def test_rewrites_before_the_search() -> None:
    # MMLU: case-insensitive, trailing full stops of the option ignored, longest option first.
    assert cc.rewrite_reply_mmlu("it is paris, not rome", ("It is Paris.", "Rome", "Oslo", "Bern")) == "A, not B"
    assert cc.rewrite_reply_mmlu("New York or York", ("York", "New York", "Boston", "Chicago")) == "B or A"
    # C-Eval: the stem before the blank becomes 答案是, the text after the last blank goes, options by letter.
    assert cc.rewrite_reply_ceval("我国的首都是北京，它位于华北平原。", CAPITAL_Q, CAPITAL) == "答案是B。"
    assert cc.rewrite_reply_ceval("是H2O", WATER_Q, WATER) == "是B"  # not "H2C" (O2 replaced later)
    # A stem of at most 4 characters is left alone; C-Eval's replacement is case-sensitive.
    assert cc.rewrite_reply_ceval("首都是北京", "首都是____。", CAPITAL) == "首都是B"
    assert cc.rewrite_reply_ceval("h2o", WATER_Q, WATER) == "h2o"


def test_an_empty_option_is_not_substituted() -> None:
    # An empty needle would put the letter between every two characters of the reply (see the docs).
    assert cc.rewrite_reply_mmlu("B is it", ("", "it", "no", "maybe")) == "B is B"
    assert cc.rewrite_reply_ceval("选B", "下列哪一项正确？", ("", "甲", "乙", "丙")) == "选B"


# ------------------------------------------------------------------------------------ fuzzy fallback
def _random_texts(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    words = ["the", "cell", "membrane", "Paris", "café", "naïve", "Ångström", "保证", "可靠", "按序", "交付",
             "42", "x=1", "!!", "", "O2", "H2O", "mitochondria", "über", "résumé", "北京", "上海"]
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 5)))

    return [(text(), [text() for _ in range(4)]) for _ in range(n)]


def test_rapidfuzz_path_picks_what_thefuzz_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    process = pytest.importorskip("thefuzz.process")
    cases = [(r, list(o)) for r, o, _, _ in MMLU_CASES] + [(r, list(o)) for r, _, o, _, _ in CEVAL_CASES]
    cases += _random_texts(400)
    official = [o.index(process.extractOne(r, o)[0]) for r, o in cases]
    assert [cc.closest_option(r, o) for r, o in cases] == official
    monkeypatch.setitem(sys.modules, "thefuzz", None)  # thefuzz not installed: rapidfuzz directly
    assert [cc.closest_option(r, o) for r, o in cases] == official


def test_without_any_fuzzy_matcher_only_the_fallback_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "thefuzz", None)
    monkeypatch.setitem(sys.modules, "rapidfuzz", None)
    assert cc.extract_choice_mmlu("The answer is B.", CAPITALS) == "B"  # no matcher needed
    with pytest.raises(ImportError, match=r"pip install 'thefuzz==0\.22\.1'"):
        cc.extract_choice_mmlu("", CAPITALS)


def test_equal_options_resolve_to_the_first() -> None:
    pytest.importorskip("thefuzz")
    assert cc.closest_option("zzz", ["same", "same", "other", "x"]) == 0
    assert cc.closest_option("other one", ["same", "other", "other", "x"]) == 1


# --------------------------------------------------------------------------------- scripted model
SCRIPT = {  # question -> reply; the expected letters worked out by hand
    "What is 3 + 4?": "The answer is A.",  # A, gold A
    "Square root of 81?": "9",  # "9" -> D, gold D
    "What is 10 / 2?": "I would choose C.",  # C, gold B
    "Which bone is in the arm?": "Humerus",  # B, gold B
    "How many chambers has the human heart?": "The human heart has two chambers on each side.",  # "two" -> A, gold C
    "2+3等于几？": "答案是A",  # A, gold A
    "一年有几个月？": "一年有12个月。",  # "12" -> C, gold C
    "中国的首都是哪里？": "A",  # A, gold B
    "宪法是国家的____。": "宪法是国家的根本大法。",  # 答案是 + "根本大法" -> A, gold A
    "水的化学式是？": "水的化学式是H2O。",  # B, gold B
    "一周有几天？": "B",  # B, gold C
    "“三人行”的下一句是？": "必有我师",  # A, gold A
}


class FakeChat:
    """Stands in for generation.chat_complete: replies from SCRIPT, records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model: Any, tokenizer: Any, queries: list[str], **kwargs: Any) -> list[str]:
        self.calls.append({"queries": list(queries), **kwargs})
        out = []
        for q in queries:
            key = next(k for k in SCRIPT if k in q)
            out.append("  " + SCRIPT[key] + "\n")  # surrounding whitespace: the reply is stripped
        return out

    @property
    def generated(self) -> int:
        return sum(len(c["queries"]) for c in self.calls)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained("qwen-demo")


FAKE_MODEL = SimpleNamespace(generation_config=SimpleNamespace(max_new_tokens=512))


def test_scripted_mmlu_gives_the_hand_computed_accuracy(data, tok, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = FakeChat()
    monkeypatch.setattr(generation, "chat_complete", fake)
    r = cc.run(FAKE_MODEL, tok, "mmlu", data["mmlu"], tmp_path, subjects=["abstract_algebra", "anatomy"],
               batch_size=2, progress=False, model_label="scripted")
    # abstract_algebra 2/3, anatomy 1/2: micro 3/5 = 60 (the macro mean would be 58.3)
    assert r["subjects"]["abstract_algebra"]["correct"] == 2 and r["subjects"]["anatomy"]["correct"] == 1
    assert r["average"] == pytest.approx(60.0)
    assert r["categories"] == {"stem": pytest.approx(60.0)}
    assert r["chat"] is True and r["task"] == "mmlu" and r["shots"] == 0 and r["split"] == "test"
    assert r["items"] == 5 and r["generated"] == 5
    assert r["rules"] == {"answer-cue": 2, "leading-letter": 2, "first-letter": 1}
    # The official settings: default system prompt, greedy, no repetition penalty, the config's max_new_tokens.
    for call in fake.calls:
        assert call["system"] == "You are a helpful assistant."
        assert call["do_sample"] is False and call["repetition_penalty"] == 1.0 and call["max_new_tokens"] == 512
        assert len(call["queries"]) <= 2
    cache = tmp_path / "items" / "mmlu-chat" / "0-shot" / "anatomy.jsonl"
    recs = [json.loads(x) for x in cache.read_text().splitlines()]
    heart = next(x for x in recs if x["index"] == 1)
    assert heart["reply"] == "The human heart has two chambers on each side."  # stripped
    assert (heart["pred"], heart["answer"], heart["correct"], heart["rule"]) == ("A", "C", False, "first-letter")
    saved = json.loads((tmp_path / "results-mmlu-chat.json").read_text())
    assert saved["average"] == pytest.approx(60.0) and saved["chat"] is True and saved["model"] == "scripted"
    md = (tmp_path / "results-mmlu-chat.md").read_text()
    assert "| scripted | mmlu-chat | 60.00 | 60.00 |" in md
    assert not list(tmp_path.glob(".*.tmp"))


def test_scripted_ceval_and_cmmlu_are_macro_averaged(data, tok, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(generation, "chat_complete", FakeChat())
    r = cc.run(FAKE_MODEL, tok, "ceval", data["ceval"], tmp_path, subjects=["advanced_mathematics", "law"],
               progress=False)
    # advanced_mathematics (STEM, Hard) 2/2 = 100, law (Humanities) 1/2 = 50
    assert r["average"] == pytest.approx(75.0) and r["hard"] == pytest.approx(100.0)
    assert r["categories"] == {"STEM": 100.0, "Humanities": 50.0} and r["split"] == "val"
    r = cc.run(FAKE_MODEL, tok, "cmmlu", data["cmmlu"], tmp_path, subjects=["anatomy", "ancient_chinese"],
               progress=False)
    # anatomy (STEM) 1/2 = 50, ancient_chinese (Social Science, China specific) 1/1 = 100
    assert r["average"] == pytest.approx(75.0)
    assert r["categories"] == {"STEM": 50.0, "Social Science": 100.0, "China specific": 100.0}
    assert (tmp_path / "results-ceval-chat.json").is_file() and (tmp_path / "results-cmmlu-chat.json").is_file()


def test_rerun_generates_only_what_is_missing(data, tok, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    first = FakeChat()
    monkeypatch.setattr(generation, "chat_complete", first)
    kw = dict(subjects=["abstract_algebra", "anatomy"], progress=False, max_new_tokens=64)
    cc.run(FAKE_MODEL, tok, "mmlu", data["mmlu"], tmp_path, **kw)
    assert first.generated == 5
    again = FakeChat()
    monkeypatch.setattr(generation, "chat_complete", again)
    r = cc.run(FAKE_MODEL, tok, "mmlu", data["mmlu"], tmp_path, **kw)
    assert again.generated == 0 and r["generated"] == 0 and r["average"] == pytest.approx(60.0)
    # An interrupted write: the last line cut; only that item is generated again.
    cache = tmp_path / "items" / "mmlu-chat" / "0-shot" / "abstract_algebra.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:15])
    r = cc.run(FAKE_MODEL, tok, "mmlu", data["mmlu"], tmp_path, **kw)
    assert again.generated == 1 and r["generated"] == 1 and r["average"] == pytest.approx(60.0)
    # Replies cached with another max_new_tokens are not reused.
    r = cc.run(FAKE_MODEL, tok, "mmlu", data["mmlu"], tmp_path, **{**kw, "max_new_tokens": 32})
    assert again.generated == 6 and r["generated"] == 5
    # --limit scores a prefix of each subject.
    r = cc.run(FAKE_MODEL, tok, "mmlu", data["mmlu"], tmp_path, **{**kw, "max_new_tokens": 32}, limit=1)
    assert r["items"] == 2 and r["generated"] == 0


def test_bad_arguments_are_named(data, tok, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="task must be one of"):
        cc.run(FAKE_MODEL, tok, "gsm8k", data["mmlu"], tmp_path)
    with pytest.raises(cc.EvalDataError, match="unknown mmlu subjects"):
        cc.run(FAKE_MODEL, tok, "mmlu", data["mmlu"], tmp_path, subjects=["cooking"])
    with pytest.raises(cc.EvalDataError, match=r"philosophy_test\.csv: no such file"):
        cc.run(FAKE_MODEL, tok, "mmlu", data["mmlu"], tmp_path, subjects=["philosophy"])
    with pytest.raises(cc.EvalDataError, match="not a directory"):
        cc.run(FAKE_MODEL, tok, "mmlu", tmp_path / "nowhere", tmp_path)


# ------------------------------------------------------------------------------------ on the model
def test_demo_model_end_to_end(data, tok, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("rapidfuzz")  # the demo's replies often need the fuzzy fallback (thefuzz installs it)
    model = AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval()
    r = cc.run(model, tok, "ceval", data["ceval"], tmp_path, subjects=["advanced_mathematics", "law"], batch_size=3,
               max_new_tokens=6, progress=False, model_label="demo")
    assert r["items"] == 4 and r["generated"] == 4 and r["max_new_tokens"] == 6
    assert set(r["subjects"]) == {"advanced_mathematics", "law"} and 0.0 <= r["average"] <= 100.0
    cache = tmp_path / "items" / "ceval-chat" / "0-shot" / "law.jsonl"
    recs = [json.loads(x) for x in cache.read_text(encoding="utf-8").splitlines()]
    assert sorted(x["index"] for x in recs) == [0, 1]
    assert all(x["pred"] in "ABCD" and x["rule"] in cc.RULES for x in recs)
    # Each cached reply is what model.chat answers with the official settings, alone.
    items = cc.read_items(cc.SPECS["ceval"], data["ceval"] / "val" / "law_val.csv")
    for x in recs:
        alone, _ = chat(model, tok, cc.chat_query("ceval", items[x["index"]]), history=None, do_sample=False,
                        repetition_penalty=1.0, max_new_tokens=6)
        assert x["reply"] == alone
    # The rerun generates nothing and gives the same numbers.
    calls: list[int] = []
    real = generation.chat_complete
    monkeypatch.setattr(generation, "chat_complete", lambda m, t, q, **k: calls.append(len(q)) or real(m, t, q, **k))
    again = cc.run(model, tok, "ceval", data["ceval"], tmp_path, subjects=["advanced_mathematics", "law"],
                   batch_size=3, max_new_tokens=6, progress=False, model_label="demo")
    assert calls == [] and again["generated"] == 0
    assert again["subjects"] == r["subjects"] and again["average"] == r["average"]
    assert json.loads((tmp_path / "results-ceval-chat.json").read_text())["items"] == 4
    assert (tmp_path / "results-ceval-chat.md").read_text().startswith("| model | task | average |")
