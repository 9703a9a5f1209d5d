"""The tool-use (ReAct plugin) benchmark (qwen/eval/plugin.py) against the official eval/evaluate_plugin.py.

Expected fields and scores below were worked out by hand from the official process_res, eval_action,
eval_action_input and main (find/rfind slicing on text + "\\n", json5 + sorted-key dumps, Rouge-L F
on Qwen token pieces, "\\nAction: " as the tool-call test), not produced by our code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.chat import chat
from qwen.eval import plugin

pytest.importorskip("json5")

# A ReAct prompt in the layout of the released files (instruction, tools, format, "Begin!", question).
HEAD = ("Answer the following questions as best you can. You have access to the following tools:\n\n"
        "{tools}\n\nUse the following format:\n\nQuestion: the input question you must answer\n"
        "Thought: you should always think about what to do\nAction: the action to take, should be one of [{names}]\n"
        "Action Input: the input to the action\nObservation: the result of the action\n"
        "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
        "Thought: I now know the final answer\nFinal Answer: the final answer to the original input question\n\n"
        "Begin!\n\nQuestion: {q}")
TOOLS = {
    "get_weather": 'get_weather: Call this tool to interact with the weather API. What is the weather API useful for? '
                   'Current weather of a city. Parameters: [{"name": "location", "required": true}, {"name": "unit"}] '
                   'Format the arguments as a JSON object.',
    "quark_search": 'quark_search: Call this tool to interact with the 夸克搜索 API. What is the 夸克搜索 API useful for? '
                    '夸克搜索是一个通用搜索引擎。 Parameters: [{"name": "query", "required": true}] '
                    'Format the arguments as a JSON object.',
    "image_gen": 'image_gen: Call this tool to interact with the 通义万相 API. What is the 通义万相 API useful for? '
                 '通义万相是一个AI绘画模型。 Parameters: [{"name": "query", "required": true}] '
                 'Format the arguments as a JSON object.',
    "search": 'search: Call this tool to interact with the search API. What is the search API useful for? '
              'Web search. Parameters: [{"name": "query", "required": true}] Format the arguments as a JSON object.',
}


def prompt(q: str, *names: str) -> str:
    return HEAD.format(tools="\n\n".join(TOOLS[n] for n in names), names=",".join(names), q=q)


POSITIVE = [
    {"prompt": prompt("What's the weather in Paris right now, in celsius?", "get_weather", "image_gen"),
     "response": 'Thought: I need the current weather of Paris.\nAction: get_weather\n'
                 'Action Input: {"location": "Paris", "unit": "celsius"}'},
    {"prompt": prompt("北京今天天气怎么样？", "quark_search", "image_gen"),
     "response": 'Thought: 我需要搜索北京的天气。\nAction: quark_search\nAction Input: {"query": "北京天气"}'},
    {"prompt": prompt("How warm is it in Paris?", "get_weather", "image_gen"),
     "response": 'Thought: I should check the weather.\nAction: get_weather\n'
                 'Action Input: {"location": "Paris", "unit": "celsius"}\nObservation:'},
    {"prompt": prompt("画一只猫", "quark_search", "image_gen"),
     "response": 'Thought: 我应该使用通义万相画图。\nAction: image_gen\nAction Input: {"query": "一只猫"}'},
    {"prompt": prompt("Who released Qwen?", "search"),
     "response": 'Thought: Let me search.\nAction: search\nAction Input: {"query": "Qwen"}'},
    {"prompt": prompt("Find news about Qwen.", "search"), "id": "extra keys are kept",
     "response": 'Thought: Search for it.\nAction: search\nAction Input: {"query": "Qwen news"}\n'
                 'Observation: Qwen released new models.\nThought: I now know the final answer\n'
                 'Final Answer: Qwen released new models.'},
]
NEGATIVE = [
    {"prompt": prompt("你好", "quark_search", "image_gen"),
     "response": "Thought: 不需要使用工具。\nFinal Answer: 你好！有什么可以帮你？"},
    {"prompt": prompt("What is 2 + 3?", "search"), "response": "Thought: I can answer directly.\nFinal Answer: 5"},
    {"prompt": prompt("Tell me a joke.", "get_weather")},
]

# Scripted replies, one per record above, and what the official script makes of each.
POS_GEN = [
    POSITIVE[0]["response"],                                     # identical: right, Rouge-L 1
    'Thought: 搜索。\nAction: Quark_Search\nAction Input: {"query": "上海天气"}',  # case ignored: right; 6/7
    'Thought: draw it\nAction: image_gen\nAction Input: {"location": "Paris", "unit": "fahrenheit"}',  # wrong; 11/13
    "Thought: I now know the final answer\nFinal Answer: 一只猫",  # no call: wrong; no input: 0
    "Thought: Let me search.\nAction: search",                   # no Action Input: right, input 0
    "Thought: Search.\nAction: search\nAction Input: {'query': 'Qwen news',}\nObservation: made up\n"
    "Thought: I now know the final answer\nFinal Answer: something",  # JSON5 input, trailing trace: right, 1
]
NEG_GEN = [
    "Thought: 不需要工具。\nFinal Answer: 你好！",                   # not a call
    'Thought: I will search.\nAction: search\nAction Input: {"query": "2 + 3"}',  # a false positive
    "Action: get_weather\nAction Input: {}",                     # no newline before "Action: ": not counted
]
EXPECTED_RIGHT = 4 / 6
EXPECTED_ROUGE = (1 + 6 / 7 + 11 / 13 + 0 + 0 + 1) / 6
EXPECTED_BAD = 1 / 3


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _write_jsonl(root / plugin.POSITIVE_FILE, POSITIVE)
    _write_jsonl(root / plugin.NEGATIVE_FILE, NEGATIVE)
    return root


# ------------------------------------------------------------------------------------------ parsing
def test_parse_well_formed_reply() -> None:
    text = 'Thought: 我需要查天气\nAction: get_weather\nAction Input: {"location": "北京"}\nObservation:'
    assert plugin.parse_react_output(text) == ("Thought: 我需要查天气", "get_weather", '{"location": "北京"}')


def test_parse_missing_action_input() -> None:
    # "Action Input:" missing: the action runs to the end, the input is the text from character 12 on.
    f = plugin.parse_react_fields("Thought: look it up\nAction: search")
    assert (f["thought"], f["action"], f["action_input"]) == ("Thought: look it up", "search", "")
    assert plugin.parse_react_fields("Thought: look it up\nAction: search", normalize=False)["action_input"] == \
        "k it up\nAction: search"


def test_parse_full_trace_with_trailing_text() -> None:
    text = ('Thought: t\nAction: search\nAction Input: {"query": "a"}\nObservation: r\n'
            "Thought: done\nFinal Answer: b")
    assert plugin.parse_react_fields(text) == {
        "thought": "Thought: t", "action": "search", "action_input": '{"query": "a"}',
        "observation": "r", "thought_last": "done", "final_answer": "b"}
    # Text after the JSON (and before any Observation) makes it unparsable.
    assert plugin.parse_react_output('Action: search\nAction Input: {"query": "a"} then more')[2] == ""


def test_parse_final_answer_only() -> None:
    text = "Thought: I now know the final answer\nFinal Answer: 42"
    f = plugin.parse_react_fields(text)
    assert f["thought"] == text
    assert f["action"] == "t: I now know the final answer\nFinal Answer: 42"  # from character 6: find() gave -1
    assert f["action_input"] == ""
    assert f["thought_last"] == "I now know the final answer"
    assert f["final_answer"] == "42"
    assert not plugin.is_tool_call(text)


def test_action_input_is_json5_normalised() -> None:
    assert plugin.normalize_action_input("{'b': 2, a: 1,}") == '{"a": 1, "b": 2}'
    assert plugin.normalize_action_input('{"q": "北京"}') == '{"q": "北京"}'
    assert plugin.normalize_action_input("[1, 2]") == "[1, 2]"
    assert plugin.normalize_action_input("") == ""
    assert plugin.normalize_action_input("not json") == ""


def test_server_parser_differs_from_the_benchmarks() -> None:
    # Why the eval keeps its own parser: the server needs "\nAction:" and keeps the raw arguments.
    from qwen.serve.react import parse_response

    text = "Action: search\nAction Input: {'query': 'x'}"
    assert parse_response(text)[1] is None
    assert plugin.parse_react_output(text)[1:] == ("search", '{"query": "x"}')


# ------------------------------------------------------------------------------------------ Rouge-L
def test_rouge_l_on_word_lists() -> None:
    assert plugin.rouge_l_f1(list("abcd"), list("acde")) == pytest.approx(0.75)
    assert plugin.rouge_l_f1(["a", "b"], ["b", "a"]) == pytest.approx(0.5)
    assert plugin.rouge_l_f1(["a"], ["a", "b", "c"]) == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))
    assert plugin.rouge_l_f1([], ["a"]) == 0.0 and plugin.rouge_l_f1([], []) == 0.0


def test_token_words_are_qwen_pieces_without_spaces() -> None:
    assert plugin.token_words('{"query": "北京天气"}') == ['{"', "query", '":', '"', "北京", "天气", '"}']
    assert plugin.action_input_rouge('Action: s\nAction Input: {"query": "北京天气"}',
                                     'Action: s\nAction Input: {"query": "上海天气"}') == pytest.approx(6 / 7)


def test_rouge_matches_rouge_score() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    class Split:
        def tokenize(self, text: str) -> list[str]:
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Split())
    pairs = [('{"location": "Paris", "unit": "celsius"}', '{"location": "Paris", "unit": "fahrenheit"}'),
             ('{"query": "北京天气"}', '{"query": "北京 今天 天气 怎么样"}'), ('{"a": [1, 2, 3]}', '{"b": [3, 2, 1]}')]
    for ref, pred in pairs:
        r, p = plugin.token_words(ref), plugin.token_words(pred)
        assert plugin.rouge_l_f1(r, p) == scorer.score(" ".join(r), " ".join(p))["rougeL"].fmeasure


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_on_scripted_replies() -> None:
    records = [{**r, "gen": g, "kind": "positive"} for r, g in zip(POSITIVE, POS_GEN)]
    records += [{**r, "gen": [g], "kind": "negative"} for r, g in zip(NEGATIVE, NEG_GEN)]  # the official cache's list
    s = plugin.score_records(records)
    assert s["action_right_rate"] == pytest.approx(100 * EXPECTED_RIGHT)
    assert s["action_input_rouge"] == pytest.approx(100 * EXPECTED_ROUGE)
    assert s["bad_rate"] == pytest.approx(100 * EXPECTED_BAD)
    assert (s["n_positive"], s["n_negative"]) == (6, 3)
    only_neg = plugin.score_records([{"gen": g} for g in NEG_GEN], kind="negative")
    assert only_neg["bad_rate"] == pytest.approx(100 / 3) and only_neg["action_right_rate"] != only_neg["action_right_rate"]
    with pytest.raises(plugin.PluginDataError, match="kind"):
        plugin.score_records([{"gen": "x"}])
    with pytest.raises(plugin.PluginDataError, match="response"):
        plugin.score_records([{"gen": "x"}], kind="positive")


def test_per_item_scores() -> None:
    assert plugin.score_item({"gen": POS_GEN[1], "response": POSITIVE[1]["response"]}, "positive") == \
        {"called": True, "action_right": True, "rouge_l": pytest.approx(6 / 7)}
    assert plugin.score_item({"gen": NEG_GEN[2]}, "negative") == {"called": False}


# --------------------------------------------------------------------------------------------- data
def test_files_are_found_by_name(data: Path, tmp_path: Path) -> None:
    assert plugin.find_files(data) == [("positive", data / plugin.POSITIVE_FILE), ("negative", data / plugin.NEGATIVE_FILE)]
    assert plugin.find_files(data / plugin.NEGATIVE_FILE) == [("negative", data / plugin.NEGATIVE_FILE)]
    old = _write_jsonl(tmp_path / "v1" / "exam_plugin_v1_react_positive.jsonl", POSITIVE[:1])
    assert plugin.find_files(old.parent) == [("positive", old)]
    _write_jsonl(tmp_path / "v1" / "mine_positive.jsonl", POSITIVE[:1])
    with pytest.raises(plugin.PluginDataError, match="several positive files"):
        plugin.find_files(old.parent)
    with pytest.raises(plugin.PluginDataError, match="'positive' or 'negative'"):
        plugin.find_files(_write_jsonl(tmp_path / "tools.jsonl", POSITIVE[:1]))


def test_bad_data_names_the_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "x_react_positive.jsonl"
    p.write_text(json.dumps(POSITIVE[0]) + "\n\n{broken\n", encoding="utf-8")
    with pytest.raises(plugin.PluginDataError, match=r"x_react_positive.jsonl: line 3: not JSON"):
        plugin.read_records(p)
    p.write_text(json.dumps({"prompt": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(plugin.PluginDataError, match=r"line 1: a positive record needs the reference 'response'"):
        plugin.read_records(p)
    n = tmp_path / "x_react_negative.jsonl"
    n.write_text(json.dumps({"prompt": "q"}) + "\n" + json.dumps({"question": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(plugin.PluginDataError, match=r"line 2: expected an object with a 'prompt' string"):
        plugin.read_records(n)


# ----------------------------------------------------------------------------------------------- run
def test_run_with_scripted_replies(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = {r["prompt"]: g for r, g in zip(POSITIVE + NEGATIVE, POS_GEN + NEG_GEN)}
    monkeypatch.setattr(plugin, "generate_replies", lambda model, tok, prompts, **kw: [script[p] for p in prompts])

    class Model:
        generation_config = None

    out = tmp_path / "out"
    res = plugin.run(Model(), plugin._default_tokenizer(), data, out, batch_size=4, progress=False, model_label="scripted")
    assert res["average"] == res["action_right_rate"] == pytest.approx(100 * EXPECTED_RIGHT)
    assert res["action_input_rouge"] == pytest.approx(100 * EXPECTED_ROUGE)
    assert res["bad_rate"] == pytest.approx(100 * EXPECTED_BAD)
    assert res["max_new_tokens"] == 512
    saved = json.loads((out / "results-plugin.json").read_text(encoding="utf-8"))
    assert saved["official"] == {
        "react_positive": {"action_right_rate": pytest.approx(EXPECTED_RIGHT), "action_input_rouge": pytest.approx(EXPECTED_ROUGE)},
        "react_negative": {"bad_rate": pytest.approx(EXPECTED_BAD)}}
    assert "| scripted | 66.67 |" in (out / "results-plugin.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    tok = AutoTokenizer.from_pretrained("qwen-demo")
    model = AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval()
    return model, tok


def test_replies_are_what_model_chat_returns(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    prompts = [r["prompt"] for r in (POSITIVE[1], NEGATIVE[1])]
    batched = plugin.generate_replies(model, tok, prompts, max_new_tokens=4, batch_size=2)
    single = [chat(model, tok, p, history=None, do_sample=False, max_new_tokens=4)[0] for p in prompts]
    assert batched == single


def test_run_end_to_end_caches_and_resumes(demo, data: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = demo
    out = tmp_path / "out"
    first = plugin.run(model, tok, data, out, limit=3, batch_size=2, progress=False, model_label="qwen-demo",
                       max_new_tokens=3)
    cache = out / "items" / "plugin" / "0-shot"
    pos_lines = (cache / "exam_plugin_v20231206_react_positive.jsonl").read_text(encoding="utf-8").splitlines()
    neg_lines = (cache / "exam_plugin_v20231206_react_negative.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(pos_lines) == 3 and len(neg_lines) == 3
    assert {json.loads(x)["index"] for x in pos_lines} == {0, 1, 2}
    assert set(json.loads(pos_lines[0])) == {"index", "kind", "gen", "called", "action_right", "rouge_l"}
    assert (first["n_positive"], first["n_negative"], first["items"]) == (3, 3, 6)
    assert json.loads((out / "results-plugin.json").read_text(encoding="utf-8"))["model"] == "qwen-demo"
    assert (out / "results-plugin.md").is_file()

    # Drop one cached reply (and cut another line mid-write): only that one is generated again.
    (cache / "exam_plugin_v20231206_react_positive.jsonl").write_text(
        "\n".join(pos_lines[:2]) + '\n{"index": 2, "ge', encoding="utf-8")
    asked: list[str] = []
    real = plugin.generate_replies

    def counting(model, tok, prompts, **kw):  # type: ignore[no-untyped-def]
        asked.extend(prompts)
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(plugin, "generate_replies", counting)
    again = plugin.run(model, tok, data, out, limit=3, batch_size=2, progress=False, model_label="qwen-demo",
                       max_new_tokens=3)
    redone = {json.loads(pos_lines[2])["index"]}
    assert asked == [POSITIVE[i]["prompt"] for i in redone]
    for key in ("action_right_rate", "action_input_rouge", "bad_rate"):
        assert again[key] == first[key] or (again[key] != again[key] and first[key] != first[key])
