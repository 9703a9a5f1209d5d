"""The ReAct prompt of the official ``examples/react_demo.py`` and a parser for what the model writes.

react_demo.py runs Qwen-Chat as a text-completion model over a hand-built ChatML string:

* each tool is one line, the server's ``TOOL_DESC`` sentence followed by a format hint
  (" Format the arguments as a JSON object." for JSON input, a triple-backtick hint for code);
* the instruction block (the same text as the server's ``REACT_INSTRUCTION``) plus
  ``"\\n\\nQuestion: {query}"`` replaces one user message: the only one on a first turn, else the
  second-to-last (the latest completed turn), never the new question of a later turn;
* every query and reply is stripped (leading newlines, trailing whitespace) before it goes in;
* the assistant turn of the new question stays open; the model writes ``Thought: / Action: /
  Action Input:`` and stops at ``Observation:``; the caller appends
  ``"\\nObservation: {result}\\nThought:"`` and lets the model continue the same turn.

:class:`ReactPrompt` holds that prompt in a structured form so that each backend can send it its
own way (token ids for a local model, messages for an OpenAI-compatible server), and
:meth:`ReactPrompt.text` gives the exact string react_demo.py would feed the model.
:func:`parse_output` reads one completion by react_demo.py's ``parse_latest_plugin_call`` rules
(the *latest* Action / Action Input, a dropped ``Observation:`` re-added), and also survives the
malformed outputs listed on each branch. :class:`SectionStream` splits a streamed completion into
thought and answer text as it arrives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..chat_template import DEFAULT_SYSTEM, IM_END, IM_START
from ..serve.react import OBSERVATION_STOP, REACT_INSTRUCTION, TOOL_DESC
from .tools import Tool

# react_demo.py's hints, appended after the "Parameters: [...]" of each tool line by args_format.
FORMAT_HINTS = {
    "json": " Format the arguments as a JSON object.",
    "code": " Enclose the code within triple backticks (`) at the beginning and end of the code.",
}
QUESTION = "\n\nQuestion: "


def _strip(text: str) -> str:
    # react_demo.py: "important, or the text differs from how the training data was built".
    return text.lstrip("\n").rstrip()


def tool_line(t: Tool) -> str:
    """One tool's description, as react_demo.py builds it."""
    return TOOL_DESC.format(
        name_for_model=t.name, name_for_human=t.name_for_human, description_for_model=t.description,
        parameters=json.dumps([p.to_qwen() for p in t.parameters], ensure_ascii=False),
    ) + FORMAT_HINTS[t.args_format]


def react_question(tools: Sequence[Tool], query: str) -> str:
    """The instruction block with the tools, then ``Question: {query}`` (react_demo.py's PROMPT_REACT)."""
    instruction = REACT_INSTRUCTION.format(tools_text="\n\n".join(tool_line(t) for t in tools),
                                           tools_name_text=", ".join(t.name for t in tools))
    return instruction + QUESTION + query


def observation_text(observation: str) -> str:
    """What follows the model's Action Input once the tool answered (react_demo.py's format)."""
    return f"\n{OBSERVATION_STOP} {observation}\nThought:"


@dataclass
class ReactPrompt:
    """A ReAct prompt: finished turns, the current user message, and the open assistant turn.

    ``history`` and ``query`` are final (the tool text already placed, stripped). The open
    assistant turn is ``scratchpad`` followed, when a tool has answered, by
    ``"\\nObservation: {observation}\\nThought:"``; ``scratchpad`` holds everything before that
    latest observation (earlier observations included, as plain text).
    """

    system: str
    history: list[tuple[str, str]]
    query: str
    scratchpad: str = ""
    observation: str | None = None
    observation_tool: str = ""  # which tool the latest observation came from

    @property
    def assistant(self) -> str:
        """The open assistant turn so far (react_demo.py's ``text``)."""
        if self.observation is None:
            return self.scratchpad
        return self.scratchpad + observation_text(self.observation)

    def messages(self) -> list[dict[str, str]]:
        """The closed part as chat messages: system, the history pairs, the current user message."""
        out = [{"role": "system", "content": self.system}]
        for q, a in self.history:
            out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"role": "user", "content": self.query})
        return out

    def text(self) -> str:
        """The exact ChatML string react_demo.py hands to ``text_completion``."""
        out = f"{IM_START}system\n{self.system}{IM_END}"
        for q, a in self.history:
            out += f"\n{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}"
        return out + f"\n{IM_START}user\n{self.query}{IM_END}\n{IM_START}assistant\n" + self.assistant

    def continued(self, output: str, observation: str, tool: str) -> "ReactPrompt":
        """The prompt for the next step: the model wrote ``output``, the tool answered ``observation``."""
        return ReactPrompt(self.system, self.history, self.query, self.assistant + output, observation, tool)


def history_pairs(history: Sequence[Any] | None) -> list[tuple[str, str]]:
    pairs = []
    for n, turn in enumerate(history or []):
        if isinstance(turn, dict):  # react_demo.py's {"user": ..., "bot": ...}
            turn = (turn.get("user", ""), turn.get("bot", ""))
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(x, str) for x in turn)):
            raise TypeError(f"history[{n}] must be a (query, reply) pair of strings, got {turn!r}")
        pairs.append((turn[0], turn[1]))
    return pairs


def build_prompt(query: str, history: Sequence[Any] | None = None, tools: Sequence[Tool] = (),
                 system: str = DEFAULT_SYSTEM) -> ReactPrompt:
    """The first prompt of a turn: react_demo.py's ``build_input_text``.

    With tools, the instruction goes into the first turn's question, or on later turns into the
    latest completed turn's question (react_demo.py: "the last or second-to-last round").
    """
    turns = history_pairs(history) + [(query, "")]
    placed = []
    for i, (q, a) in enumerate(turns):
        if tools and (len(turns) == 1 or i == len(turns) - 2):
            q = react_question(tools, q)
        placed.append((_strip(q), _strip(a)))
    return ReactPrompt(system, placed[:-1], placed[-1][0])


# ---------------------------------------------------------------------------------------------- parsing
ACTION, ACTION_INPUT, OBSERVATION, FINAL = "\nAction:", "\nAction Input:", "\nObservation:", "\nFinal Answer:"


def _drop_thought_marker(text: str) -> str:
    """The thought: the text after the last line-initial "Thought:" (a continuation has none)."""
    text = "\n" + text
    t = text.rfind("\nThought:")
    return (text[t + len("\nThought:"):] if t >= 0 else text).strip()


@dataclass
class ParsedOutput:
    """One completion read as a ReAct step.

    ``action`` is None when the model did not ask for a tool; then ``final_answer`` holds the
    answer (after "Final Answer:", else the whole text) and ``has_final`` says whether the marker
    was there. ``text`` is the completion as kept in the assistant turn: cut before any
    ``Observation:`` the model wrote itself (react_demo.py keeps ``text[:k]``).
    """

    text: str
    thought: str = ""
    action: str | None = None
    action_input: str = ""
    final_answer: str | None = None
    has_final: bool = False
    problems: list[str] = field(default_factory=list)  # what was malformed (for logs and tests)


def parse_output(output: str) -> ParsedOutput:
    """Parse a completion (the stop word already removed or not).

    Rules, react_demo.py's first: the latest ``Action:`` before the latest ``Action Input:`` is a
    call; its input runs to ``Observation:`` (or the end). Beyond the demo:

    * markers count at the very start of the output too (the demo needs a newline before them);
    * ``Action:`` without ``Action Input:`` is still a call, unless a Final Answer follows it:
      the input is whatever follows the action's line (often nothing);
    * an empty action name is reported as such (the agent answers it with the list of tools)
      instead of ending the turn as the demo does;
    * ``Final Answer:`` with no Thought before it, or with no space after the colon, is an answer.
    """
    s = "\n" + output  # so a marker on the first line is found like any other
    i, j = s.rfind(ACTION), s.rfind(ACTION_INPUT)
    problems: list[str] = []
    if 0 <= i < j:
        k = s.rfind(OBSERVATION)
        if k < j:  # the stop word removed it, or the model never wrote it
            k = len(s.rstrip())
        name = s[i + len(ACTION):j].strip()
        if "\n" in name:
            problems.append("text between Action and Action Input")
            name = name.split("\n", 1)[0].strip()
        args = s[j + len(ACTION_INPUT):k].strip()
        if not args:
            problems.append("empty Action Input")
        return ParsedOutput(s[1:k], _drop_thought_marker(s[1:i]), name, args, problems=problems)
    f = s.rfind(FINAL)
    if i >= 0 and f < i:
        line_end = s.find("\n", i + 1)
        line_end = len(s) if line_end < 0 else line_end
        k = s.find(OBSERVATION, i)
        k = len(s.rstrip()) if k < 0 else k
        name = s[i + len(ACTION):line_end].strip()
        args = s[line_end:k].strip() if line_end < k else ""
        problems.append("missing Action Input")
        return ParsedOutput(s[1:k], _drop_thought_marker(s[1:i]), name, args, problems=problems)
    if f >= 0:
        return ParsedOutput(output, _drop_thought_marker(s[1:f]), final_answer=s[f + len(FINAL):].strip(),
                            has_final=True)
    problems.append("neither an Action nor a Final Answer")
    return ParsedOutput(output, final_answer=_drop_thought_marker(output), problems=problems)


# ---------------------------------------------------------------------------------------------- streaming
_MARKERS = {"Thought:": "thought", "Action:": "action", "Action Input:": "action_input",
            "Final Answer:": "answer", "Observation:": "observation"}


class SectionStream:
    """Split streamed model text into (section, text) pieces as it arrives.

    Sections start at a marker at the beginning of a line (``Thought:``, ``Action:``,
    ``Action Input:``, ``Final Answer:``, ``Observation:``); the marker, the spaces after it and the
    newline before it are not part of any piece. Only the start of a line is held back, and only
    while it could still become a marker.
    """

    def __init__(self, section: str = "thought") -> None:
        self.section = section
        self.head = ""  # the start of the current line, while it may still be a marker
        self.at_line_start = True
        self.newlines = 0  # newlines seen but not yet emitted (dropped if a marker follows)
        self.skip_spaces = True
        self.started = False  # anything emitted in the current section yet

    def _body(self, out: list[tuple[str, str]], text: str) -> None:
        if self.skip_spaces:
            text = text.lstrip(" \t")
            if not text:
                return
            self.skip_spaces = False
        if self.started:
            text = "\n" * self.newlines + text
        self.newlines, self.started = 0, True
        if out and out[-1][0] == self.section:
            out[-1] = (self.section, out[-1][1] + text)
        else:
            out.append((self.section, text))

    def feed(self, delta: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for ch in delta:
            if ch == "\n":
                if self.head:  # a line that began like a marker but ended
                    self._body(out, self.head)
                    self.head = ""
                self.newlines += 1
                self.at_line_start = True
            elif not self.at_line_start:
                self._body(out, ch)
            else:
                self.head += ch
                if self.head in _MARKERS:
                    self.section = _MARKERS[self.head]
                    self.head, self.at_line_start = "", False
                    self.newlines, self.skip_spaces, self.started = 0, True, False
                elif not any(m.startswith(self.head) for m in _MARKERS):
                    head, self.head, self.at_line_start = self.head, "", False
                    self._body(out, head)
        return out

    def finish(self) -> list[tuple[str, str]]:
        """Whatever was held back (a last line that looked like the start of a marker)."""
        out: list[tuple[str, str]] = []
        if self.head:
            head, self.head = self.head, ""
            self._body(out, head)
        return out
