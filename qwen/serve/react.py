"""Function calling for Qwen-Chat through the ReAct prompt the models were trained on.

The prompt text and the parsing rules are those of the official ``openai_api.py`` (see
docs/serving.md), so a Qwen-Chat checkpoint calls tools the way it learned to. On top of it:
the current ``tools`` / ``tool_choice`` fields map onto the same mechanism, and
:class:`ReactStreamParser` lets a streaming response carry function calls (the official refused
``stream=true`` with functions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API."
    " What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

OBSERVATION_STOP = "Observation:"
FINAL_ANSWER = "\nFinal Answer: "


def react_instruction(functions: Sequence[dict[str, Any]]) -> str:
    """The tool block prepended to the question (official field fallbacks: name_for_model -> name ...)."""
    tools, names = [], []
    for fn in functions:
        name = fn.get("name", "")
        name_m = fn.get("name_for_model", name)
        tools.append(TOOL_DESC.format(
            name_for_model=name_m, name_for_human=fn.get("name_for_human", name),
            description_for_model=fn.get("description_for_model", fn.get("description", "")),
            parameters=json.dumps(fn.get("parameters", {}), ensure_ascii=False)))
        names.append(name_m)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(tools), tools_name_text=", ".join(names)).strip()


@dataclass
class FunctionCall:
    name: str
    arguments: str
    thought: str  # the text before the Action, without "Thought: " (the message content)


def parse_response(text: str) -> tuple[str, FunctionCall | None]:
    """(content, call) from a ReAct completion, by the official rules.

    A call needs ``\\nAction:`` followed by ``\\nAction Input:``; the arguments run to
    ``\\nObservation:`` (re-added when the stop word ate it). Without a call the content is what
    follows the last ``\\nFinal Answer: `` (or the whole text).
    """
    i = text.find("\nAction:")
    j = text.find("\nAction Input:")
    k = text.find("\nObservation:")
    if 0 <= i < j:
        if k < j:  # the stop word cut "Observation:" off
            text = text.rstrip() + "\nObservation:"
        k = text.find("\nObservation:", j)
        name = text[i + len("\nAction:"):j].strip()
        args = text[j + len("\nAction Input:"):k].strip()
        if name:
            thought = text[:i]
            t = thought.find("Thought: ")
            if t >= 0:
                thought = thought[t + len("Thought: "):]
            return thought.strip(), FunctionCall(name, args, thought.strip())
    z = text.rfind(FINAL_ANSWER)
    if z >= 0:
        text = text[z + len(FINAL_ANSWER):]
    return text, None


class ReactStreamParser:
    """Incremental ReAct parsing for streaming: the final answer streams as it is generated.

    Text before ``\\nFinal Answer: `` is held (it may turn out to be a Thought/Action); once the
    marker is seen (with no Action before it), everything after it goes out as content. At the end,
    :meth:`finish` returns whatever is left and the function call, if the completion was one. (The
    non-streaming parser takes the LAST Final Answer; a stream commits to the first.)
    """

    def __init__(self) -> None:
        self.text = ""
        self.answer_start: int | None = None
        self.sent = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.answer_start is None:
            z = self.text.find(FINAL_ANSWER)
            if z < 0 or "\nAction:" in self.text[:z]:
                return ""
            self.answer_start = self.sent = z + len(FINAL_ANSWER)
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out

    def finish(self) -> tuple[str, FunctionCall | None]:
        """(content not yet sent, function call or None)."""
        if self.answer_start is not None:
            return self.text[self.sent:], None
        return parse_response(self.text)
