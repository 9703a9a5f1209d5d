"""GSM8K (qwen/eval/gsm8k.py) against the official evaluate_gsm8k.py / evaluate_chat_gsm8k.py.

Every expected prompt, extracted answer and verdict below was written by hand from reading the
official scripts (doc_to_text, decode, extract_answer_hf, extract_answer, is_correct, number_equal),
not produced by our code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen.eval import generation
from qwen.eval import gsm8k
from qwen.eval.gsm8k import INVALID
from qwen.eval.multiple_choice import EvalDataError

# The first two problems of the GSM8K train split, as the dataset writes them.
TRAIN = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
                 "friends in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty has 3 apples.", "answer": "She has 3.\n#### 3"},
]
TEST = [
    {"question": "Janet has 16 eggs and eats 3. How many are left?", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
    {"question": "A shop sells 1,000 pens a day. How many in 2 days?", "answer": "1000*2=<<1000*2=2000>>2000\n#### 2,000"},
    {"question": "The temperature is 2 and drops by 5. What is it now?", "answer": "2-5=<<2-5=-3>>-3\n#### -3"},
]


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "gsm8k"
    _jsonl(d / "train.jsonl", TRAIN)
    _jsonl(d / "test.jsonl", TEST)
    return d


# --------------------------------------------------------------------------------------- base answers
BASE_CASES = [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\nThe answer is 72", 72),
    ("The answer is 1,234", 234),                 # the comma splits the number
    ("He pays $18.", 18),
    ("The answer is 3.5", 5),                     # no decimals: the last digit run
    ("The answer is 42.0", 0),
    ("The answer is -3", 3),                      # no sign
    ("It costs $0.50", 50),
    ("The meeting ends at 10:05", INVALID),       # "05" is not a Python literal
    ("The answer is 00", 0),                      # but "00" is
    ("no numbers here", INVALID),
    ("", INVALID),
    ("The answer is 18 dollars", 18),
    ("There are 7 days a week, so 2 weeks", 2),
    ("The answer is 5%", 5),
    ("5 apples and 12 pears", 12),
    ("x = 2^10 = 1024\nThe answer is 1024", 1024),
    ("The answer is \u0663", INVALID),            # an Arabic-Indic digit: matched by \d, not a literal
    ("The answer is " + "1" * 5000, INVALID),     # past Python's int string limit
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\nThe answer is 18", 18),
]


@pytest.mark.parametrize("completion,expected", BASE_CASES)
def test_base_extraction_is_the_official_one(completion: str, expected: Any) -> None:
    got = gsm8k.extract_base(completion)
    assert got == expected and type(got) is type(expected)


def test_base_gold_and_correctness() -> None:
    assert gsm8k.gold_number("a\n#### 72") == 72
    assert gsm8k.gold_number("#### 2,000") == 2000
    assert gsm8k.gold_number("#### -3") == -3
    assert gsm8k.gold_number("#### 0.5") == 0.5
    got = gsm8k.gold_number("#### 72.")
    assert got == 72.0 and isinstance(got, float)
    for bad in ("#### 1.2.3", "#### 05", "####72", "#### abc", "no final answer", "#### -"):
        with pytest.raises(ValueError):
            gsm8k.gold_number(bad)
    assert gsm8k.base_correct("The answer is 72", 72.0)       # int == float
    assert gsm8k.base_correct("The answer is 2000", 2000)
    assert not gsm8k.base_correct("The answer is 2,000", 2000)  # last run "000" is 0
    assert not gsm8k.base_correct("The answer is -3", -3)       # the sign is lost
    assert not gsm8k.base_correct("The answer is 0.5", 0.5)
    assert not gsm8k.base_correct("nothing", 0)


# --------------------------------------------------------------------------------------- chat answers
CHAT_CASES = [
    ("Natalia sold 48 / 2 = 24 clips in May. In total she sold 48 + 24 = 72 clips.", "72"),
    ("The answer is 18.", "18."),                 # a trailing point belongs to the number
    ("He has $1,234 left.", "1234"),
    ("Total: 1,234,567", "1234567"),
    ("12,34", "34"),                              # not thousands groups: two numbers
    ("1,2345", "2345"),
    ("The answer is 10,00", "00"),
    ("The temperature dropped to -5 degrees", "-5"),
    ("+7 points", "7"),
    ("about .5 of it", ".5"),
    ("pi is 3.14159", "3.14159"),
    ("It happened on 2023-10-05", "-05"),
    ("5 apples and 0 oranges", "0"),
    ("No digits at all.", None),
    ("The final answer is $\\boxed{42}$", "42"),
    ("50%", "50"),
    ("x1", "1"),
    ("1.5.3", ".3"),
    ("0123", "0123"),
    ("1e5", "5"),
    ("3/4", "4"),
    ("Answer: 1,000.", "1000."),
    ("\u0661\u0662", None),                       # non-ASCII digits cannot start a number
    ("So she makes 9 * 2 = $18 every day at the farmers' market.\n\nThe answer is: $18", "18"),
]


@pytest.mark.parametrize("reply,expected", CHAT_CASES)
def test_chat_extraction_is_the_official_one(reply: str, expected: str | None) -> None:
    assert gsm8k.extract_chat(reply) == expected


def test_chat_comparison_is_the_official_one() -> None:
    eq = gsm8k.numbers_equal
    assert eq("18", "18.") and eq("18", "18.00001") and not eq("18", "18.001")
    assert eq("0.5", ".5") and eq("-3", "-3") and not eq("3", "-3")
    assert not eq("10", "010") and not eq("5", "-05")           # not literals: "cannot compare"
    assert not eq("5", None)
    big = "1" * 400
    assert not eq(big, big)                                       # float overflow in isclose: counted wrong
    assert gsm8k.extract_chat(TEST[1]["answer"]) == "2000"        # chat gold: last number of the whole answer
    assert gsm8k.extract_chat(TEST[2]["answer"]) == "-3"
    assert gsm8k.chat_correct("The temperature is now -3 degrees.", TEST[2]["answer"])
    assert gsm8k.chat_correct("They sell 2,000 pens.", TEST[1]["answer"])
    assert not gsm8k.chat_correct("They sell 2000 pens in 2 days", TEST[1]["answer"])


# --------------------------------------------------------------------------------------------- prompts
SHOT_1 = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
          "friends in May. How many clips did Natalia sell altogether in April and May?\n"
          "Let's think step by step\n"
          "Natalia sold 48/2 = 24 clips in May.\n"
          "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
          "The answer is 72\n")
SHOT_2 = ("Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
          "How much did she earn?\n"
          "Let's think step by step\n"
          "Weng earns 12/60 = $0.2 per minute.\n"
          "Working 50 minutes, she earned 0.2 x 50 = $10.\n"
          "The answer is 10\n")
Q = "Janet has 16 eggs and eats 3. How many are left?"


def test_prompts_from_the_train_file(data: Path) -> None:
    train = gsm8k.read_jsonl(data / "train.jsonl")
    prefix = gsm8k.shots_prefix(train, 2)
    assert prefix == SHOT_1 + "\n" + SHOT_2
    assert gsm8k.base_prompt(prefix, Q) == SHOT_1 + "\n" + SHOT_2 + "\nQuestion: " + Q + "\nLet's think step by step\n"
    assert gsm8k.chat_query(prefix, Q) == SHOT_1 + "\n" + SHOT_2 + "\nQuestion: " + Q + "\nLet's think step by step"
    assert gsm8k.chat_query("", Q) == Q                          # 0-shot chat: the bare question
    assert gsm8k.count_shots(prefix) == 2
    with pytest.raises(EvalDataError, match="4 shots asked, the train file has 3"):
        gsm8k.shots_prefix(train, 4)


def test_prompt_file_is_used_verbatim(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pf = tmp_path / "prompt.txt"
    pf.write_text("Question: A?\nLet's think step by step\nstep\nThe answer is 1\n\n"
                  "Question: B?\nLet's think step by step\nstep\nThe answer is 2\n", encoding="utf-8")
    seen: dict[str, Any] = {}

    def fake_complete(model, tokenizer, prompts, *, max_new_tokens, stop_strings, batch_size, **kw):  # type: ignore[no-untyped-def]
        seen.setdefault("prompts", []).extend(prompts)
        seen.update(max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings))
        return ["The answer is 13"] * len(prompts)

    monkeypatch.setattr(generation, "complete", fake_complete)
    res = gsm8k.run(None, None, data, tmp_path / "out", prompt_file=pf, limit=1, progress=False)
    assert seen["prompts"] == ["Question: A?\nLet's think step by step\nstep\nThe answer is 1\n\n"
                               "Question: B?\nLet's think step by step\nstep\nThe answer is 2\n"
                               "\nQuestion: " + Q + "\nLet's think step by step\n"]
    assert seen["max_new_tokens"] == 512
    assert seen["stop_strings"] == ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")
    assert res["shots"] == 2 and res["average"] == 100.0
    assert (tmp_path / "out" / "items" / "gsm8k" / "2-shot" / "test.jsonl").is_file()
    with pytest.raises(EvalDataError, match="holds 2 examples, but 8 shots"):
        gsm8k.run(None, None, data, tmp_path / "out", prompt_file=pf, shots=8, progress=False)


# ------------------------------------------------------------------------------------------- scoring
def test_base_accuracy_cache_and_resume(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replies = {TEST[0]["question"]: "16 - 3 = 13\nThe answer is 13",
               TEST[1]["question"]: "1,000 * 2 = 2,000\nThe answer is 2,000",   # extracted 0: wrong
               TEST[2]["question"]: "2 - 5 = -3\nThe answer is -3"}            # extracted 3: wrong
    calls: list[int] = []

    def fake_complete(model, tokenizer, prompts, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        out = []
        for p in prompts:
            assert p.startswith(SHOT_1 + "\n" + SHOT_2 + "\nQuestion: ")  # 2 shots from train.jsonl beside test
            out.append(next(v for q, v in replies.items() if p.endswith(q + "\nLet's think step by step\n")))
        return out

    monkeypatch.setattr(generation, "complete", fake_complete)
    out = tmp_path / "run"
    res = gsm8k.run(None, None, data, out, shots=2, batch_size=2, progress=False, model_label="m")
    assert sorted(calls) == [1, 2]                                 # batch_size 2: batches of 2 and 1
    assert res["task"] == "gsm8k" and res["model"] == "m" and res["chat"] is False and res["shots"] == 2
    assert res["items"] == 3 and res["correct"] == 1 and res["average"] == pytest.approx(100 / 3)
    assert "train.jsonl" in res["prompt"] and "differ" in res["prompt"]
    recs = {r["index"]: r for r in map(json.loads, (out / "items/gsm8k/2-shot/test.jsonl").read_text().splitlines())}
    assert recs[0]["extracted"] == 13 and recs[0]["gold"] == 13 and recs[0]["correct"] is True
    assert recs[1]["extracted"] == 0 and recs[1]["gold"] == 2000 and recs[1]["correct"] is False
    assert recs[2]["extracted"] == 3 and recs[2]["gold"] == -3
    saved = json.loads((out / "results-gsm8k.json").read_text())
    assert saved["average"] == res["average"]
    assert "| m | gsm8k | 2 | 3 | 33.33 |" in (out / "results-gsm8k.md").read_text()

    def must_not_run(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("everything is cached")

    monkeypatch.setattr(generation, "complete", must_not_run)
    again = gsm8k.run(None, None, data, out, shots=2, batch_size=2, progress=False, model_label="m")
    assert again["average"] == res["average"] and again["cached"] == 3
    # An interrupted run: the last cache line cut in half is generated again.
    cache = out / "items/gsm8k/2-shot/test.jsonl"
    keep = [x for x in cache.read_text().splitlines() if json.loads(x)["index"] != 2]
    cache.write_text("\n".join(keep) + '\n{"index": 2, "ke')
    monkeypatch.setattr(generation, "complete", fake_complete)
    calls.clear()
    third = gsm8k.run(None, None, data, out, shots=2, batch_size=2, progress=False)
    assert calls == [1] and third["correct"] == 1
    # Other settings (another max_new_tokens) do not reuse these records.
    calls.clear()
    gsm8k.run(None, None, data, out, shots=2, batch_size=8, progress=False, max_new_tokens=16)
    assert calls == [3]


def test_chat_accuracy(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_chat(model, tokenizer, queries, *, max_new_tokens, batch_size, **kw):  # type: ignore[no-untyped-def]
        assert max_new_tokens == 512
        assert kw["repetition_penalty"] == 1.0    # the chat scripts reset the chat config's 1.1
        seen.extend(queries)
        table = {TEST[0]["question"]: "Janet has 16 - 3 = 13 eggs left.",
                 TEST[1]["question"]: "The shop sells 1,000 * 2 = 2,000 pens.",
                 TEST[2]["question"]: "It is now 2 - 5 = -3 degrees."}
        return [table[q] for q in queries]

    monkeypatch.setattr(generation, "chat_complete", fake_chat)
    res = gsm8k.run(None, None, data / "test.jsonl", tmp_path / "c", chat=True, progress=False)
    assert sorted(seen) == sorted(t["question"] for t in TEST)    # 0-shot: the bare questions
    assert res["shots"] == 0 and res["chat"] is True and res["average"] == 100.0
    rec = json.loads((tmp_path / "c/items/gsm8k-chat/0-shot/test.jsonl").read_text().splitlines()[0])
    assert set(rec) >= {"index", "generation", "extracted", "gold", "correct"}
    assert (tmp_path / "c/results-gsm8k-chat.json").is_file() and (tmp_path / "c/results-gsm8k-chat.md").is_file()


# ---------------------------------------------------------------------------------------------- errors
def test_data_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = _jsonl(tmp_path / "a.jsonl", [TEST[0], "{not json"])
    with pytest.raises(EvalDataError, match=r"a\.jsonl: line 2: not valid JSON"):
        gsm8k.read_jsonl(bad)
    bad = _jsonl(tmp_path / "b.jsonl", [TEST[0], TEST[1], {"question": "q"}])
    with pytest.raises(EvalDataError, match=r"b\.jsonl: line 3: missing or non-string 'answer'"):
        gsm8k.read_jsonl(bad)
    bad = _jsonl(tmp_path / "c.jsonl", [{"question": "q", "answer": "it is 5"}])
    with pytest.raises(EvalDataError, match=r"c\.jsonl: line 1: .*#### N"):
        gsm8k.read_jsonl(bad)
    bad = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "x\n#### 1.2.3"}])
    with pytest.raises(EvalDataError, match=r"d\.jsonl: line 1: the final answer '1.2.3' is not a number"):
        gsm8k.read_jsonl(bad)
    bad = _jsonl(tmp_path / "e.jsonl", [[1, 2]])
    with pytest.raises(EvalDataError, match=r"e\.jsonl: line 1: expected an object"):
        gsm8k.read_jsonl(bad)
    with pytest.raises(EvalDataError, match="without test.jsonl"):
        gsm8k.find_test_file(tmp_path)
    with pytest.raises(EvalDataError, match="no such file"):
        gsm8k.find_test_file(tmp_path / "missing.jsonl")
    only_test = _jsonl(tmp_path / "t" / "test.jsonl", TEST)
    with pytest.raises(EvalDataError, match=r"train\.jsonl: no such file; a 8-shot GSM8K run needs a few-shot prompt"):
        gsm8k.run(None, None, only_test, tmp_path / "o", progress=False)


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    from qwen import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained("qwen-demo")
    return AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval(), tok


@pytest.mark.parametrize("chat", [False, True])
def test_end_to_end_with_the_demo_model(demo: tuple[Any, Any], data: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, chat: bool) -> None:
    model, tok = demo
    out = tmp_path / "e2e"
    kw: dict[str, Any] = dict(chat=chat, limit=2, batch_size=2, progress=False, max_new_tokens=4, model_label="demo")
    if not chat:
        kw["shots"] = 1
    res = gsm8k.run(model, tok, data, out, **kw)
    name = "gsm8k-chat" if chat else "gsm8k"
    recs = (out / "items" / name / ("0-shot" if chat else "1-shot") / "test.jsonl").read_text().splitlines()
    assert len(recs) == 2 and res["items"] == 2 and 0.0 <= res["average"] <= 100.0
    assert json.loads((out / f"results-{name}.json").read_text())["model"] == "demo"
    monkeypatch.setattr(generation, "complete", None)   # a resumed run must not generate
    monkeypatch.setattr(generation, "chat_complete", None)
    again = gsm8k.run(model, tok, data, out, **kw)
    assert again["cached"] == 2 and again["average"] == res["average"]
