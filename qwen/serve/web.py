"""The Gradio chat page behind ``qwen web`` (docs/web-demo.md).

Every browser tab gets its own ChatSession (kept in ``gr.State``), and all of them generate through
one shared continuous-batching Engine, so concurrent users are decoded together, as with
``qwen serve``. The history holds the model's raw text: what the page renders (Markdown, code,
LaTeX) is derived from it and never fed back, unlike the official web_demo.py, which stored the
replies converted to HTML and sent those to the model on the next turn.

``create_web_app`` builds the page without launching it; ``WebChat`` holds the event handlers, which
are plain (generator) functions so they can be driven directly in tests.
"""

from __future__ import annotations

import os

# Gradio reads this when it is imported; set it first so no usage data is ever sent.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import queue
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence


class _LazyGradio:
    """``gr.X`` imports gradio on first use: importing this module must not need the ``web`` extra."""

    def __getattr__(self, name: str) -> Any:
        import gradio

        return getattr(gradio, name)


gr: Any = _LazyGradio()
from ..chat import ChatSession
from ..chat_template import DEFAULT_SYSTEM
from ..generate import GenerationConfig
from .engine import FINISH_CANCELLED, Engine, EngineStopped, Event, QueueFull, RequestParams

# $$...$$ and \[...\] are display math, $...$ and \(...\) inline. The longer "$$" must come before "$".
LATEX_DELIMITERS: list[dict[str, str | bool]] = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]

# System fonts only: Gradio's default theme fetches its fonts from Google, which a local page
# that promises not to phone home should not do.
_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
_MONO_FONTS = ("ui-monospace", "Consolas", "monospace")

Messages = list[dict[str, str]]


@dataclass
class Settings:
    """The generation controls of the page, in the order the page passes them."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    repetition_penalty: float
    seed: int | None = None  # None or negative: a fresh random seed for every answer

    @classmethod
    def from_config(cls, cfg: GenerationConfig) -> "Settings":
        return cls(temperature=float(cfg.temperature) if cfg.do_sample else 0.0, top_p=float(cfg.top_p),
                   top_k=int(cfg.top_k or 0), max_new_tokens=int(cfg.max_new_tokens or 512),
                   repetition_penalty=float(cfg.repetition_penalty or 1.0), seed=cfg.seed)

    def as_config(self) -> dict[str, Any]:
        """GenerationConfig fields. Temperature 0 means greedy decoding, as in the API server."""
        greedy = self.temperature <= 0
        seed = None if self.seed is None or self.seed == "" or int(self.seed) < 0 else int(self.seed)
        return {"do_sample": not greedy, "temperature": 1.0 if greedy else float(self.temperature),
                "top_p": float(self.top_p), "top_k": int(self.top_k), "max_new_tokens": int(self.max_new_tokens),
                "repetition_penalty": float(self.repetition_penalty), "seed": seed}


class _StoppableEngine:
    """The shared Engine as one browser tab's ChatSession sees it, plus a Stop for that tab.

    ChatSession streams through ``stream()``; ``stop()`` (called from another request thread)
    cancels the request in flight. The engine then ends the stream with finish_reason
    "cancelled", so ChatSession records the partial reply like any finished one: what the user
    saw stays in the history the model sees next.
    """

    Params = Engine.Params  # what ChatSession builds its requests with

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._request: Any = None
        self._stop = threading.Event()

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    def stream(self, prompt_ids: Sequence[int], params: RequestParams) -> Iterator[Event]:
        events: queue.Queue[Event] = queue.Queue()
        req = self._engine.submit(prompt_ids, params, events.put)
        self._request = req
        # stop() sets the flag, then reads _request; this publishes _request, then reads the flag.
        # One side always sees the other, so a Stop racing with the start of an answer is not lost.
        if self._stop.is_set():
            req.cancel()
        try:
            while True:
                ev = events.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self._request = None
            if not req.finished:  # the consumer went away (tab closed): free the batch row
                req.cancel()

    def arm(self) -> None:
        """Forget an earlier Stop before a new answer starts."""
        self._stop.clear()

    def stop(self) -> None:
        self._stop.set()
        req = self._request
        if req is not None:
            req.cancel()


class UserChat:
    """One browser tab's conversation: its ChatSession and a lock that allows one answer at a time."""

    def __init__(self, model: Any, tokenizer: Any, engine: Engine, generation_config: GenerationConfig,
                 system: str) -> None:
        self.engine = _StoppableEngine(engine)
        self.session = ChatSession(model, tokenizer, system=system, engine=self.engine,
                                   generation_config=generation_config)
        self.busy = threading.Lock()
        # Tools panel: the tab's agent (rebuilt when the tool selection changes) and, per history
        # index, what the page shows for an agent turn (thoughts, tool calls, figures, the answer).
        self.agent: Any = None
        self.agent_tools: tuple[str, ...] = ()
        self.traces: dict[int, Messages] = {}

    @property
    def history(self) -> list[tuple[str, str]]:
        return self.session.history

    def close(self) -> None:
        """Called by Gradio when the tab's state is dropped: stop whatever it still generates."""
        self.engine.stop()
        self.close_agent()

    def close_agent(self) -> None:
        if self.agent is not None:
            self.agent.close()  # the code interpreter's sandbox process and directory
            self.agent, self.agent_tools = None, ()


def to_messages(history: Sequence[Sequence[str]], pending: tuple[str, str] | None = None,
                traces: dict[int, Messages] | None = None, pending_trace: Messages | None = None) -> Messages:
    """The Chatbot value (display text) for a raw history plus, optionally, the answer in progress.

    ``traces`` replace the assistant side of agent turns (by history index) with their tool-use
    messages; ``pending_trace`` does so for the turn in progress.
    """
    out: Messages = []
    turns = [*history, *([pending] if pending else [])]
    for i, (query, reply) in enumerate(turns):
        out.append({"role": "user", "content": display_text(query)})
        trace = pending_trace if pending and i == len(turns) - 1 else (traces or {}).get(i)
        if trace is not None:
            out.extend(trace)
        else:
            out.append({"role": "assistant", "content": display_text(reply)})
    return out


TOOL_CHOICES = ("calculator", "code_interpreter")


class TraceView:
    """Agent events as Chatbot messages: each thought and tool call a collapsible bubble, figures as
    images, the final answer as the plain reply."""

    def __init__(self) -> None:
        self.messages: Messages = []
        self.answer = ""
        self._thought = ""

    def _bubble(self, title: str, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text, "metadata": {"title": title}})

    def add(self, ev: Any) -> None:
        if ev.kind == "thought":
            self._thought += ev.text
            if self.messages and self.messages[-1].get("metadata", {}).get("title") == "Thought":
                self.messages[-1]["content"] = display_text(self._thought.strip())
            else:
                self._bubble("Thought", display_text(self._thought.strip()))
        elif ev.kind == "answer":
            self.answer += ev.text
        elif ev.kind == "action":
            self._thought, self.answer = "", ""
            self._bubble(f"Tool: {ev.tool}", "```\n" + (ev.arguments or "").strip() + "\n```")
        elif ev.kind == "observation":
            images = re.findall(r"!\[figure\]\(([^)]+)\)", ev.text)
            text = re.sub(r"!\[figure\]\([^)]+\)\n?", "", ev.text).strip()
            self._bubble(f"Result of {ev.tool}", "```\n" + text + "\n```" if text else "(no output)")
            for path in images:
                if os.path.isfile(path):
                    self.messages.append({"role": "assistant", "content": {"path": path, "alt_text": "figure"}})
        elif ev.kind == "final":
            self.answer = ev.text

    def view(self) -> Messages:
        shown = [*self.messages]
        if self.answer:
            shown.append({"role": "assistant", "content": display_text(self.answer)})
        return shown


# Fenced blocks (``` or ~~~, up to the closing fence or the end) and inline code spans: Markdown
# shows their content literally, so the display rewrite below must leave them alone.
_CODE = re.compile(
    r"(?:^|(?<=\n))[ \t]*(`{3,}|~{3,})[^\n]*"       # an opening fence line
    r"(?:(?:\n.*?)?\n[ \t]*\1[`~]*[ \t]*(?=\n|\Z)"  # ... up to its closing fence
    r"|.*)"                                          # ... or, unclosed, to the end
    r"|(`+)(?!`).*?(?<!`)\2(?!`)",                   # an inline code span
    re.S)
# '<' that starts something Markdown would pass on as HTML: a tag, a closing tag, a comment or <!DOCTYPE>.
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def display_text(text: str) -> str:
    """The text the Chatbot renders for a message. Only this display copy is rewritten; the history
    keeps the raw text, which is what the model sees again.

    Outside code: an HTML tag is shown as text, not interpreted, so "use <br> for a line break" or
    "<script>" is visible rather than swallowed by the sanitiser; and a ``$`` that cannot open or
    close inline math (pandoc's rule: ``$`` then non-space ... non-space then ``$`` not followed by
    a digit) is shown as a dollar sign, so "$5 and $10" is not set as math.
    """
    parts, last = [], 0
    for m in _CODE.finditer(text):
        parts.append(_display_prose(text[last:m.start()]))
        parts.append(m.group(0))
        last = m.end()
    parts.append(_display_prose(text[last:]))
    return "".join(parts)


def _display_prose(text: str) -> str:
    return _escape_dollars(_TAG_START.sub("&lt;", text))


_DOLLAR = "<span>&#36;</span>"


def _escape_dollars(text: str) -> str:
    # The page finds math twice: in the Markdown source and in each run of adjacent DOM text
    # (KaTeX auto-render). A "$" written as an entity inside its own element is invisible to both;
    # a backslash escape or a bare entity is not (tried in Chromium).
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":  # keep escapes (\$, \(, \[) as written
            out.append(text[i:i + 2])
            i += 2
        elif c != "$":
            out.append(c)
            i += 1
        elif text.startswith("$$", i):
            end = text.find("$$", i + 2)
            if end < 0:
                out.append(_DOLLAR * 2)
                i += 2
            else:
                out.append(text[i:end + 2])
                i = end + 2
        else:
            end = _inline_math_end(text, i)
            if end < 0:
                out.append(_DOLLAR)
                i += 1
            else:
                out.append(text[i:end + 1])
                i = end + 1
    return "".join(out)


def _inline_math_end(text: str, start: int) -> int:
    """Index of the ``$`` closing inline math opened at ``start``, or -1 when that ``$`` is literal.

    Pandoc's rule (``$`` + non-space ... non-space + ``$`` not followed by a digit), made stricter:
    the closer must be the next unescaped ``$`` in the paragraph. Otherwise "$5 and $10, $x$" would
    set "5 and $10, " as math, as pandoc does.
    """
    if start + 1 >= len(text) or text[start + 1].isspace():
        return -1
    end = start + 1
    while True:
        end = text.find("$", end)
        if end < 0 or text[end - 1] != "\\":
            break
        end += 1
    if end < 0 or "\n\n" in text[start:end]:
        return -1
    if text[end - 1].isspace() or text[end + 1:end + 2].isdigit():
        return -1
    return end


class WebChat:
    """The page's event handlers, independent of the widgets (tests drive them directly).

    Each handler takes the tab's ``UserChat`` (None before the first message) and returns or
    yields it, so Gradio stores it in the tab's ``gr.State``.
    """

    def __init__(self, engine: Engine, model: Any, tokenizer: Any,
                 generation_config: GenerationConfig | dict | None = None, system: str = DEFAULT_SYSTEM) -> None:
        self.engine, self.model, self.tokenizer = engine, model, tokenizer
        base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
        self.generation_config = ChatSession(model, tokenizer, generation_config=base).generation_config
        self.system = system
        self.defaults = Settings.from_config(self.generation_config)

    def new_user(self, system: str | None = None) -> UserChat:
        return UserChat(self.model, self.tokenizer, self.engine, self.generation_config,
                        self.system if system is None else system)

    # ------------------------------------------------------------------ handlers
    def submit(self, message: str, user: UserChat | None, system: str,
               settings: Settings, tools: Sequence[str] = ()) -> Iterator[tuple[Messages, UserChat, str]]:
        """Send ``message``; yields (chatbot, state, textbox) as the answer streams in. With ``tools``
        selected, a ReAct agent answers (docs/agents.md)."""
        user = user or self.new_user(system)
        if not message.strip():
            yield to_messages(user.history, traces=user.traces), user, message
            return
        if not user.busy.acquire(blocking=False):
            gr.Warning("An answer is still being written: wait for it or press Stop.")
            yield gr.skip(), user, gr.skip()  # type: ignore[misc]
            return
        try:
            for messages, dropped in self._answer(user, message, system, settings, tools):
                # A turn that was not recorded puts the message back into the box, so it is not lost.
                yield messages, user, message if dropped else ""
        finally:
            user.busy.release()

    def regenerate(self, user: UserChat | None, system: str,
                   settings: Settings, tools: Sequence[str] = ()) -> Iterator[tuple[Messages, UserChat]]:
        """Answer the last user message again, replacing the last reply."""
        user = user or self.new_user(system)
        if not user.busy.acquire(blocking=False):
            gr.Warning("An answer is still being written: wait for it or press Stop.")
            yield gr.skip(), user  # type: ignore[misc]
            return
        try:
            if not user.history:
                gr.Info("Nothing to regenerate yet.")
                yield to_messages(user.history, traces=user.traces), user
                return
            query, reply = user.history.pop()
            trace = user.traces.pop(len(user.history), None)
            dropped = False
            for messages, dropped in self._answer(user, query, system, settings, tools):
                if not dropped:
                    yield messages, user
            if dropped:  # no new answer: keep the old one rather than lose the turn
                user.history.append((query, reply))
                if trace is not None:
                    user.traces[len(user.history) - 1] = trace
                yield to_messages(user.history, traces=user.traces), user
        finally:
            user.busy.release()

    def clear(self, user: UserChat | None) -> tuple[Messages, UserChat | None]:
        """Empty the history (stopping an answer in progress first)."""
        if user is None:
            return [], None
        user.engine.stop()
        # The stopped answer ends within one decode step and records its turn; wait for that,
        # then clear, so the turn cannot reappear afterwards.
        if user.busy.acquire(timeout=60):
            try:
                user.session.clear()
                user.traces.clear()
            finally:
                user.busy.release()
        else:
            user.session.clear()
            user.traces.clear()
        return [], user

    @staticmethod
    def stop(user: UserChat | None) -> None:
        """Stop the answer in progress. The partial reply stays in the chat and the history; an
        answer stopped before its first word is dropped (see ``_answer``)."""
        if user is not None:
            user.engine.stop()

    # ------------------------------------------------------------------ the streaming loop
    def _answer(self, user: UserChat, query: str, system: str, settings: Settings,
                tools: Sequence[str] = ()) -> Iterator[tuple[Messages, bool]]:
        """(chatbot value, dropped) while ``query`` is answered.

        At the end the turn is in the history, or, with ``dropped`` True, it is not: the request
        failed (a notice says why) or was stopped before any text came.
        """
        if tools:
            yield from self._answer_with_tools(user, query, system, settings, tuple(tools))
            return
        user.close_agent()
        session = user.session
        done = list(session.history)
        try:
            session.system = system
            session.set_config(**settings.as_config())
        except (ValueError, TypeError) as e:
            gr.Warning(f"Invalid generation settings: {e}")
            yield to_messages(done, traces=user.traces), True
            return
        user.engine.arm()
        yield to_messages(done, (query, ""), traces=user.traces), False
        reply = ""
        try:
            for delta in session.send(query, stream=True):
                reply += delta
                yield to_messages(done, (query, reply), traces=user.traces), False
        except QueueFull as e:
            gr.Warning(f"The server is busy: {e}")
            yield to_messages(done, traces=user.traces), True
            return
        except ValueError as e:  # the prompt does not fit the context window
            gr.Warning(f"{e} Press Clear to start a new conversation.")
            yield to_messages(done, traces=user.traces), True
            return
        except (RuntimeError, EngineStopped) as e:  # the engine failed this request, or is shutting down
            gr.Warning(f"Generation failed: {e}")
            yield to_messages(done, traces=user.traces), True
            return
        last = session.last_response
        if last is not None and last.finish_reason == FINISH_CANCELLED and not session.history[-1][1]:
            # Stopped before the first word: an empty reply is no answer to keep in the conversation.
            session.history.pop()
            yield to_messages(session.history, traces=user.traces), True
            return
        yield to_messages(session.history, traces=user.traces), False


    def _answer_with_tools(self, user: UserChat, query: str, system: str, settings: Settings,
                           tools: tuple[str, ...]) -> Iterator[tuple[Messages, bool]]:
        """The tools panel's path: a ReAct agent over the shared engine answers ``query``."""
        from ..agent import Agent, EngineBackend, get_tool

        session = user.session
        done = list(session.history)
        unknown = [t for t in tools if t not in TOOL_CHOICES]
        if unknown:
            gr.Warning(f"Unknown tool(s): {', '.join(unknown)}")
            yield to_messages(done, traces=user.traces), True
            return
        if user.agent is None or user.agent_tools != tools or user.agent.system != system:
            user.close_agent()
            user.agent = Agent(EngineBackend(user.engine, self.tokenizer), [get_tool(t) for t in tools], system=system)
            user.agent_tools = tools
        cfg = settings.as_config()
        user.agent.backend.settings = {"do_sample": cfg["do_sample"], "temperature": cfg["temperature"],
                                       "top_p": cfg["top_p"], "top_k": cfg["top_k"],
                                       "repetition_penalty": cfg["repetition_penalty"],
                                       "max_new_tokens": cfg["max_new_tokens"], "seed": cfg["seed"]}
        user.engine.arm()
        view = TraceView()
        yield to_messages(done, (query, ""), traces=user.traces, pending_trace=[]), False
        result = None
        try:
            for ev in user.agent.stream(query, history=done):
                view.add(ev)
                if ev.kind == "final":
                    result = ev.result
                yield to_messages(done, (query, ""), traces=user.traces, pending_trace=view.view()), False
                if user.engine._stop.is_set():
                    break
        except QueueFull as e:
            gr.Warning(f"The server is busy: {e}")
            yield to_messages(done, traces=user.traces), True
            return
        except (ValueError, RuntimeError, EngineStopped) as e:
            gr.Warning(f"Generation failed: {e}")
            yield to_messages(done, traces=user.traces), True
            return
        answer = result.answer if result is not None else view.answer
        if not answer and not view.messages:  # stopped before anything happened
            yield to_messages(done, traces=user.traces), True
            return
        session.history.append((query, answer))
        user.traces[len(session.history) - 1] = view.view()
        yield to_messages(session.history, traces=user.traces), False


def create_web_app(engine: Engine, model: Any, tokenizer: Any, *,
                   generation_config: GenerationConfig | dict | None = None, system: str = DEFAULT_SYSTEM,
                   title: str = "Qwen", concurrency_limit: int | None = None) -> gr.Blocks:
    """The chat page as a ``gr.Blocks`` (not launched; see ``launch``).

    ``engine`` must be started. ``concurrency_limit`` caps the answers generated at once (default:
    the engine's batch size, so every running answer gets a batch row).
    """
    chat = WebChat(engine, model, tokenizer, generation_config=generation_config, system=system)
    d = chat.defaults
    limit = concurrency_limit or engine.max_batch_size

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nAnswers are generated locally. Markdown, code and LaTeX are rendered.")
        user = gr.State(None, delete_callback=lambda u: u.close() if u is not None else None)
        # No copy buttons: they would copy the display text (see display_text), not the raw reply.
        # Code blocks keep their own copy button, which copies the code as generated.
        chatbot = gr.Chatbot(label="Chat", height=520, latex_delimiters=LATEX_DELIMITERS, render_markdown=True,
                             sanitize_html=True, allow_tags=False, buttons=[], feedback_options=None,
                             elem_id="chatbot")
        textbox = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, lines=1,
                             max_lines=12, submit_btn=False, elem_id="input")
        with gr.Row():
            send_btn = gr.Button("Send", variant="primary", elem_id="send")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            regen_btn = gr.Button("Regenerate", elem_id="regenerate")
            clear_btn = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("System prompt and generation settings", open=False):
            system_box = gr.Textbox(value=system, label="System prompt", lines=2,
                                    info="Used from the next answer on, for the whole conversation.")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature",
                                        info="0 = greedy (always the most likely token)")
                top_p = gr.Slider(0.0, 1.0, value=d.top_p, step=0.01, label="Top-p")
                top_k = gr.Slider(0, 200, value=d.top_k, step=1, label="Top-k", info="0 = off")
            with gr.Row():
                max_new_tokens = gr.Slider(1, max(engine.max_model_len - 1, 1), value=min(d.max_new_tokens,
                                           max(engine.max_model_len - 1, 1)), step=1, label="Max new tokens")
                repetition_penalty = gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.01,
                                               label="Repetition penalty", info="1 = off")
                # -1, not an empty box: an empty Gradio Number shows as 0, which reads like a fixed seed.
                seed = gr.Number(value=-1 if d.seed is None else d.seed, precision=0, minimum=-1, label="Seed",
                                 info="-1 = a new random answer each time")
        with gr.Accordion("Tools", open=False):
            tools_box = gr.CheckboxGroup(list(TOOL_CHOICES), value=[], label="Tools the model may use",
                                         info="With a tool selected, the model answers as a ReAct agent: its "
                                         "thoughts and tool calls are shown. The code interpreter runs Python in "
                                         "a sandbox (no network, time and memory limits); figures appear here.",
                                         elem_id="tools")
        settings = [temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed]

        # Gradio streams only from generator functions, so these wrappers re-yield.
        def on_submit(message: str, state: UserChat | None, system_prompt: str, tools: list[str],
                      *values: Any) -> Iterator[tuple[Any, ...]]:
            yield from chat.submit(message, state, system_prompt, Settings(*values), tools or ())

        def on_regenerate(state: UserChat | None, system_prompt: str, tools: list[str],
                          *values: Any) -> Iterator[tuple[Any, ...]]:
            yield from chat.regenerate(state, system_prompt, Settings(*values), tools or ())

        submit_args: dict[str, Any] = dict(fn=on_submit, inputs=[textbox, user, system_box, tools_box, *settings],
                                           outputs=[chatbot, user, textbox], concurrency_limit=limit,
                                           concurrency_id="generate", show_progress="minimal")
        textbox.submit(api_name="chat", **submit_args)
        send_btn.click(api_visibility="private", **submit_args)
        regen_btn.click(on_regenerate, inputs=[user, system_box, tools_box, *settings], outputs=[chatbot, user],
                        concurrency_limit=limit, concurrency_id="generate", show_progress="minimal",
                        api_name="regenerate")
        # Stop and Clear skip the queue: they must work while every slot is busy generating.
        stop_btn.click(chat.stop, inputs=[user], outputs=None, queue=False, api_name="stop")
        clear_btn.click(chat.clear, inputs=[user], outputs=[chatbot, user], queue=False, api_name="clear")
        # The Chatbot's own trash icon empties only the widget: make it clear the history too.
        chatbot.clear(chat.clear, inputs=[user], outputs=[chatbot, user], queue=False, api_visibility="private")
    return app


def theme() -> gr.themes.Base:
    return gr.themes.Default(font=list(_FONTS), font_mono=list(_MONO_FONTS))


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, inbrowser: bool = False,
           block: bool = True, max_threads: int = 40, quiet: bool = False) -> Any:
    """Serve the page on ``host:port``: analytics off, never shared, no server-side rendering.

    With ``block=False`` it returns at once (the server runs in a thread; ``app.close()`` ends it).
    """
    app.queue(default_concurrency_limit=None)
    return app.launch(server_name=host, server_port=port, share=False, inbrowser=inbrowser,
                      prevent_thread_lock=not block, max_threads=max_threads, quiet=quiet, show_error=True,
                      ssr_mode=False, mcp_server=False, enable_monitoring=False, theme=theme(),
                      footer_links=["gradio"])
