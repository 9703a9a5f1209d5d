"""The ReAct loop of the official ``examples/react_demo.py`` (``llm_with_plugin``), made robust.

Per user turn: build the prompt (react_demo.py's layout, see :mod:`qwen.agent.react`), let the model
continue the open assistant turn until it stops at ``Observation:``, parse the latest Action and
Action Input, run the tool, append ``"\\nObservation: {result}\\nThought:"`` to the same assistant
turn and let the model go on, until it writes no Action. The whole assistant text is the turn's
reply in the history, as in the demo. Where the demo would crash or loop, the agent answers the
model instead: an unknown tool, unparsable or invalid arguments and a tool that raises all become
the Observation; ``max_steps`` bounds the tool calls of a turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from ..chat_template import DEFAULT_SYSTEM, IM_END
from ..serve.react import OBSERVATION_STOP
from .backends import ModelBackend
from .react import ReactPrompt, SectionStream, build_prompt, history_pairs, parse_output
from .tools import Tool, ToolInputError, as_tool

STOPPED_FINAL, STOPPED_NO_ACTION, STOPPED_STEP_LIMIT = "final_answer", "no_action", "step_limit"


class AgentStep(NamedTuple):
    """One tool call: what the model thought, which tool, the raw Action Input, what came back."""

    thought: str
    action: str
    action_input: str
    observation: str


@dataclass
class AgentResult:
    """The outcome of one user turn.

    ``stopped``: "final_answer" (the model wrote one), "no_action" (it wrote neither an Action nor
    a Final Answer: its text is the answer, as in react_demo.py) or "step_limit". ``response`` is
    the whole assistant turn (react_demo.py's reply); ``transcript`` the prompt text plus that turn,
    exactly as the model saw and wrote it; ``history`` the history for the next turn.
    """

    answer: str
    steps: list[AgentStep]
    transcript: str
    stopped: str
    response: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)

    @property
    def final_answer(self) -> str:
        return self.answer


@dataclass
class AgentEvent:
    """Something that happened during :meth:`Agent.stream`.

    kinds: "thought" and "answer" carry text pieces as the model writes them ("answer" pieces are
    provisional: an Action later in the same completion takes precedence); "action" (``tool``,
    ``arguments``) comes once a completion asked for a tool; "observation" (``text``, ``tool``)
    once the tool answered; "final" last, with the answer in ``text`` and the :class:`AgentResult`.
    """

    kind: str
    text: str = ""
    step: int = 0
    tool: str | None = None
    arguments: str | None = None
    result: AgentResult | None = None


class Agent:
    """A ReAct agent over any backend (:class:`LocalBackend`, :class:`OpenAIBackend`, ...).

    ``tools`` may hold :class:`Tool` objects, plain functions (wrapped with Tool.from_function) or
    names of registered tools. ``max_steps`` is the most tool calls per user turn.
    """

    def __init__(self, model_backend: ModelBackend, tools: Sequence[Tool | Callable[..., Any] | str] = (), *,
                 system: str = DEFAULT_SYSTEM, max_steps: int = 8,
                 stop_words: Sequence[str] = (OBSERVATION_STOP,)) -> None:
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        self.backend = model_backend
        self.tools = [as_tool(t) for t in tools]
        names = [t.name for t in self.tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two tools are named {', '.join(dupes)}")
        self.tools_by_name = {t.name: t for t in self.tools}
        self.system = system
        self.max_steps = max_steps
        self.stop_words = list(stop_words)

    # ------------------------------------------------------------------ public
    def close(self) -> None:
        """Release the tools' resources (the code interpreter's sandbox process and temp directory)."""
        for t in self.tools:
            close = getattr(t, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(self, query: str, history: Sequence[Any] | None = None) -> AgentResult:
        """Answer one user turn (``history``: earlier (query, reply) pairs, e.g. a result's ``history``)."""
        for event in self._loop(query, history, streaming=False):
            if event.kind == "final":
                assert event.result is not None
                return event.result
        raise AssertionError("the agent loop ended without a final event")

    def stream(self, query: str, history: Sequence[Any] | None = None) -> Iterator[AgentEvent]:
        """Like :meth:`run`, as events while they happen; the last event is "final"."""
        return self._loop(query, history, streaming=True)

    def observe(self, action: str, action_input: str) -> str:
        """The Observation for a call: the tool's output, or an explanation the model can act on."""
        t = self.tools_by_name.get(action)
        if t is None:
            valid = ", ".join(self.tools_by_name) or "(none)"
            what = f'there is no tool named "{action}"' if action else "the Action names no tool"
            return f"Error: {what}. The available tools are: {valid}. Use one of them, or give the Final Answer."
        try:
            return t.call(action_input)
        except ToolInputError as e:
            return f"Error: {e}"
        except Exception as e:  # the tool's own failure is information for the model, not a crash
            return f"Error: the tool {action} raised {type(e).__name__}: {e}"

    # ------------------------------------------------------------------ the loop
    def _complete(self, prompt: ReactPrompt, streaming: bool, step: int) -> Iterator[AgentEvent | str]:
        """Events for the streamed pieces, then the completion itself (a str) last."""
        if not streaming:
            yield self.backend.complete(prompt, self.stop_words)
            return
        sections = SectionStream()
        pieces = []
        for delta in self.backend.stream(prompt, self.stop_words):
            pieces.append(delta)
            for kind, text in sections.feed(delta):
                if kind in ("thought", "answer"):
                    yield AgentEvent(kind, text, step)
        for kind, text in sections.finish():
            if kind in ("thought", "answer"):
                yield AgentEvent(kind, text, step)
        yield "".join(pieces)

    def _loop(self, query: str, history: Sequence[Any] | None, streaming: bool) -> Iterator[AgentEvent]:
        first = build_prompt(query, history, self.tools, self.system)
        prompt = first
        steps: list[AgentStep] = []
        while True:
            output = ""
            for item in self._complete(prompt, streaming, len(steps)):
                if isinstance(item, str):
                    output = item
                else:
                    yield item
            output = output.replace(IM_END, "")  # a server that leaks the end marker as text
            parsed = parse_output(output)
            if parsed.action is None:
                stopped = STOPPED_FINAL if parsed.has_final else STOPPED_NO_ACTION
                yield self._final(first, prompt.assistant + output, parsed.final_answer or "", steps, stopped,
                                  query, history)
                return
            if len(steps) >= self.max_steps:
                answer = (f"Stopped: the step limit of {self.max_steps} tool call{'s' if self.max_steps != 1 else ''} "
                          f"was reached without a final answer.")
                yield self._final(first, prompt.assistant + output, answer, steps, STOPPED_STEP_LIMIT, query, history)
                return
            yield AgentEvent("action", step=len(steps), tool=parsed.action, arguments=parsed.action_input)
            observation = self.observe(parsed.action, parsed.action_input)
            yield AgentEvent("observation", observation, len(steps), tool=parsed.action)
            steps.append(AgentStep(parsed.thought, parsed.action, parsed.action_input, observation))
            prompt = prompt.continued(parsed.text, observation, parsed.action)

    def _final(self, first: ReactPrompt, response: str, answer: str, steps: list[AgentStep], stopped: str,
               query: str, history: Sequence[Any] | None) -> AgentEvent:
        result = AgentResult(answer=answer, steps=steps, transcript=first.text() + response, stopped=stopped,
                             response=response, history=history_pairs(history) + [(query, response)])
        return AgentEvent("final", answer, len(steps), result=result)

