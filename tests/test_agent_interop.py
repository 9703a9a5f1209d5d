"""qwen.agent.interop: transformers' HF Agent hook (the official transformers_agent.md) and plugin-benchmark records."""

from __future__ import annotations

import pytest

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.agent import Agent, ScriptedBackend
from qwen.agent.interop import HfAgentLLM, plugin_records
from qwen.eval.plugin import score_records

# The shape of transformers' run prompt (tools, task, "Answer:"), with the Human:/Assistant: words the
# official example rewrites.
RUN_PROMPT = ("I will ask you to perform a task, your job is to come up with a series of simple commands in Python "
              "that will perform the task.\nTools:\n- image_generator: This is a tool that creates an image.\n\n"
              "Human: Draw me a picture of rivers and lakes.\nAssistant: Answer:")


def test_generate_one_rewrites_reserved_words_and_cuts_at_stop() -> None:
    seen = []

    def chat(prompt, stop):  # type: ignore[no-untyped-def]
        seen.append((prompt, list(stop)))
        return "I will use image_generator.\n```py\nimage = image_generator('rivers')\n```\n_HUMAN_: more\nTask: next"

    llm = HfAgentLLM(chat)
    out = llm.generate_one(RUN_PROMPT, stop=["Task:", "Human:"])
    prompt, stop = seen[0]
    assert "Human:" not in prompt and "_HUMAN_: Draw me" in prompt and "_ASSISTANT_: Answer:" in prompt
    assert stop == ["Task:", "_HUMAN_:"]
    assert out == "I will use image_generator.\n```py\nimage = image_generator('rivers')\n```\n"
    assert llm.generate_many([RUN_PROMPT, RUN_PROMPT], ["Task:"])[1].endswith("Human: more\n")


def test_local_model_and_server_give_the_same_agent_text() -> None:
    model = AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval()
    tok = AutoTokenizer.from_pretrained("qwen-demo")
    local = HfAgentLLM.local(model, tok, max_new_tokens=24).generate_one(RUN_PROMPT, ["Task:"])
    assert isinstance(local, str) and "Task:" not in local

    openai = pytest.importorskip("openai")
    from serve_helpers import ServerThread

    from qwen.serve.app import create_app
    from qwen.serve.engine import Engine

    with Engine(model, tok) as engine, ServerThread(create_app(engine, tok, model_id="qwen")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        remote = HfAgentLLM.openai(client=client, model="qwen", max_tokens=24).generate_one(RUN_PROMPT, ["Task:"])
    assert remote == local  # greedy on both sides; the server applies the same stop


def test_plugin_records_score_an_agents_transcripts() -> None:
    call = 'Thought: look it up\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
    def get_weather(city: str) -> str:
        return "sunny"

    runs = [Agent(ScriptedBackend([call, "Final Answer: sunny"]), [get_weather]).run("weather?")]
    wrong = Agent(ScriptedBackend(['Action: search\nAction Input: {"q": "x"}\n', "Final Answer: ?"]), []).run("?")
    quiet = Agent(ScriptedBackend(["Final Answer: hello"]), []).run("hi")
    reference = 'Thought: weather\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: sunny'
    records = plugin_records([runs[0], wrong, quiet], [reference, reference, None])
    scores = score_records(records)
    assert scores["action_right_rate"] == pytest.approx(50.0)
    # Rouge-L F1 over Qwen token pieces: 1 for the right input; {"q": "x"} vs {"city": "Paris"} share
    # 4 of 6 pieces ('{"', '":', '"', '"}'), F1 = 2/3.
    assert scores["action_input_rouge"] == pytest.approx(100 * (1 + 4 / 6) / 2)
    assert scores["bad_rate"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 agent results for 1 references"):
        plugin_records([quiet, quiet], [None])
