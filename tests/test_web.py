"""``qwen web``: the Gradio chat page.

The handlers are driven directly (no browser): streaming, raw history, Regenerate, Clear, Stop,
with a scripted engine for exact replies and with the real Engine + demo model. Then the page
itself runs in headless Chromium through Playwright; those tests skip when Playwright or a
Chromium binary is missing (Debian: ``apt-get install chromium``; ``pip install playwright==1.65.2``;
no ``playwright install`` needed, the system browser is used).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.cli import main as cli_main
from qwen.serve.engine import Engine, Event, QueueFull

try:  # the command's --help must work without gradio; everything else here needs it
    from qwen.serve.web import (
        LATEX_DELIMITERS,
        Settings,
        UserChat,
        WebChat,
        create_web_app,
        display_text,
        launch,
        to_messages,
    )
except ImportError:
    HAVE_GRADIO = False
else:
    HAVE_GRADIO = True
needs_gradio = pytest.mark.skipif(not HAVE_GRADIO, reason="gradio is not installed (pip install gradio==6.31.0)")

REPO = Path(__file__).resolve().parents[1]

# A reply that HTML-escaping (as the official web_demo.py did) would change.
RAW_REPLY = 'Use <b>bold</b> & "quotes", a < b.\n```python\nprint("<a>" if x & 1 else \'&amp;\')\n```'


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    if not HAVE_GRADIO:
        pytest.skip("gradio is not installed (pip install gradio==6.31.0)")
    model = AutoModelForCausalLM.from_pretrained("qwen-demo").eval()
    return model, AutoTokenizer.from_pretrained("qwen-demo")


@pytest.fixture(scope="module")
def engine(demo: tuple[Any, Any]) -> Iterator[Engine]:
    with Engine(*demo, max_batch_size=4) as eng:
        yield eng


class FakeRequest:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.finished = False

    def cancel(self) -> None:
        self.cancelled.set()


class FakeEngine:
    """Stands in for Engine: answers request i with replies[i] (the last one repeats), a few
    characters per event from its own thread, and records every prompt and cancellation.
    With ``pause_after`` it stops after that many events until the request is cancelled."""

    max_batch_size = 4
    max_model_len = 512

    def __init__(self, replies: list[str], piece: int = 4, delay: float = 0.0, pause_after: int | None = None) -> None:
        self.replies, self.piece, self.delay, self.pause_after = replies, piece, delay, pause_after
        self.prompts: list[list[int]] = []
        self.cancelled = 0

    def submit(self, prompt_ids: list[int], params: Any, on_event: Callable[[Event], None]) -> FakeRequest:
        self.prompts.append(list(prompt_ids))
        reply = self.replies[min(len(self.prompts), len(self.replies)) - 1]
        req = FakeRequest()
        threading.Thread(target=self._run, args=(req, reply, on_event), daemon=True).start()
        return req

    def _run(self, req: FakeRequest, reply: str, on_event: Callable[[Event], None]) -> None:
        for n, i in enumerate(range(0, len(reply), self.piece)):
            if self.pause_after is not None and n == self.pause_after:
                req.cancelled.wait(timeout=30)
            if req.cancelled.is_set():
                break
            on_event(Event(text=reply[i:i + self.piece], token_ids=[0]))
            time.sleep(self.delay)
        cancelled = req.cancelled.is_set()
        self.cancelled += cancelled
        req.finished = True
        on_event(Event(finish_reason="cancelled" if cancelled else "stop"))


def run(handler: Iterator[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return list(handler)


def greedy(chat: WebChat) -> Settings:
    return Settings(**{**vars(chat.defaults), "temperature": 0.0})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the command
def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["web", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "127.0.0.1" in out and "--share" not in out


def test_no_share_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["web", "--share"])
    assert exc.value.code == 2


def test_help_names_the_real_default_system_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    from qwen.chat_template import DEFAULT_SYSTEM

    with pytest.raises(SystemExit):
        cli_main(["web", "--help"])
    assert DEFAULT_SYSTEM in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------ settings and display
@needs_gradio
def test_temperature_zero_is_greedy() -> None:
    cfg = Settings(temperature=0.0, top_p=0.8, top_k=0, max_new_tokens=64, repetition_penalty=1.1).as_config()
    assert cfg["do_sample"] is False and cfg["temperature"] == 1.0 and cfg["seed"] is None
    assert Settings(0.5, 1.0, 0, 8, 1.0, seed=-1).as_config()["seed"] is None  # the page's "random"
    cfg = Settings(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=8, repetition_penalty=1.0, seed=3).as_config()
    assert cfg == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_new_tokens": 8,
                   "repetition_penalty": 1.0, "seed": 3}


def test_defaults_come_from_the_checkpoint(demo: tuple[Any, Any]) -> None:
    chat = WebChat(FakeEngine(["x"]), *demo)  # type: ignore[arg-type]
    cfg = demo[0].generation_config
    assert chat.defaults.top_p == cfg.top_p and chat.defaults.max_new_tokens == cfg.max_new_tokens
    assert chat.defaults.temperature == (cfg.temperature if cfg.do_sample else 0.0)


@needs_gradio
@pytest.mark.parametrize("raw, shown", [
    ("use <br> here", "use &lt;br> here"),
    ("a < b & c", "a < b & c"),
    ("`<b>` and ```\n<i>\n```", "`<b>` and ```\n<i>\n```"),
    ("```html\n<div>unclosed", "```html\n<div>unclosed"),
    ("Costs $5 and $10, $x^2$", "Costs <span>&#36;</span>5 and <span>&#36;</span>10, $x^2$"),
    ("$$\\frac12$$ \\(a\\) \\[b\\]", "$$\\frac12$$ \\(a\\) \\[b\\]"),
    ("echo `$HOME $PATH`", "echo `$HOME $PATH`"),
])
def test_display_text(raw: str, shown: str) -> None:
    assert display_text(raw) == shown


@needs_gradio
def test_latex_delimiters_cover_all_four_forms() -> None:
    pairs = [(d["left"], d["right"]) for d in LATEX_DELIMITERS]
    assert pairs.index(("$$", "$$")) < pairs.index(("$", "$"))  # "$$" must win over "$"
    assert {("\\(", "\\)"), ("\\[", "\\]")} <= set(pairs)


# ------------------------------------------------------------------ handlers, scripted engine
def test_submit_streams_and_keeps_raw_text(demo: tuple[Any, Any]) -> None:
    fake = FakeEngine([RAW_REPLY, "ok"])
    chat = WebChat(fake, *demo)  # type: ignore[arg-type]
    steps = run(chat.submit("Hi <there> & you", None, "Be brief.", chat.defaults))
    user = steps[-1][1]
    assert isinstance(user, UserChat)
    replies = [messages[-1]["content"] for messages, _, _ in steps if messages]
    assert len(set(replies)) > 3 and replies[0] == ""  # streamed: the reply grows event by event
    assert all(box == "" for _, _, box in steps)  # the input box is emptied
    assert user.history == [("Hi <there> & you", RAW_REPLY)]
    assert steps[-1][0] == to_messages(user.history)

    run(chat.submit("again", user, "Be brief.", chat.defaults))
    prompt = demo[1].decode(fake.prompts[1])
    # The model sees exactly what it wrote (and what the user typed), not an HTML rendering of it.
    assert RAW_REPLY in prompt and "Hi <there> & you" in prompt
    assert "&lt;" not in prompt and "&amp;amp;" not in prompt and "<br>" not in prompt
    assert "Be brief." in prompt
    assert user.history[-1] == ("again", "ok")


def test_regenerate_replaces_the_last_reply(demo: tuple[Any, Any]) -> None:
    fake = FakeEngine(["first", "second"])
    chat = WebChat(fake, *demo)  # type: ignore[arg-type]
    user = run(chat.submit("Question", None, "sys", chat.defaults))[-1][1]
    assert user.history == [("Question", "first")]
    steps = run(chat.regenerate(user, "sys", chat.defaults))
    assert user.history == [("Question", "second")]
    assert steps[-1][0] == to_messages(user.history)
    assert fake.prompts[1] == fake.prompts[0]  # the old reply is not part of the new prompt


def test_regenerate_without_history_is_harmless(demo: tuple[Any, Any]) -> None:
    chat = WebChat(FakeEngine(["x"]), *demo)  # type: ignore[arg-type]
    steps = run(chat.regenerate(None, "sys", chat.defaults))
    assert steps[-1][0] == [] and steps[-1][1].history == []


def test_clear_empties_the_history(demo: tuple[Any, Any]) -> None:
    fake = FakeEngine(["remember me", "fresh"])
    chat = WebChat(fake, *demo)  # type: ignore[arg-type]
    user = run(chat.submit("one", None, "sys", chat.defaults))[-1][1]
    messages, same = chat.clear(user)
    assert messages == [] and same is user and user.history == []
    run(chat.submit("two", user, "sys", chat.defaults))
    assert "remember me" not in demo[1].decode(fake.prompts[1])
    assert chat.clear(None) == ([], None)


def test_stop_cancels_and_keeps_the_partial_reply(demo: tuple[Any, Any]) -> None:
    fake = FakeEngine(["abcdefghijklmnopqrstuvwxyz", "next"], piece=2, pause_after=3)
    chat = WebChat(fake, *demo)  # type: ignore[arg-type]
    gen = chat.submit("go", None, "sys", chat.defaults)
    shown = ""
    while shown != "abcdef":  # three events of two characters, then the engine waits
        messages, user, _ = next(gen)
        shown = messages[-1]["content"]
    # A second message while this one is running is refused, not interleaved.
    with pytest.warns(UserWarning, match="still being written"):
        assert run(chat.submit("meanwhile", user, "sys", chat.defaults))[0][0] == {"__type__": "update"}
    WebChat.stop(user)  # what the Stop button calls (from another request thread in the page)
    rest = list(gen)
    assert fake.cancelled == 1
    assert user.history == [("go", "abcdef")]  # what the user saw is what the model will see
    assert rest[-1][0] == to_messages(user.history)
    # The next answer is not affected by the earlier Stop.
    run(chat.submit("more", user, "sys", chat.defaults))
    assert user.history[-1] == ("more", "next") and fake.cancelled == 1
    assert "abcdef" in demo[1].decode(fake.prompts[1])


def test_stop_before_the_first_word_drops_the_turn(demo: tuple[Any, Any]) -> None:
    fake = FakeEngine(["first", "never shown"])
    chat = WebChat(fake, *demo)  # type: ignore[arg-type]
    user = run(chat.submit("Q", None, "sys", chat.defaults))[-1][1]
    fake.pause_after = 0  # the next request waits before its first event
    for text in ("R", None):  # a new message, then a regeneration
        gen = chat.submit(text, user, "sys", chat.defaults) if text else chat.regenerate(user, "sys", chat.defaults)
        first = next(gen)
        assert first[0][-1] == {"role": "assistant", "content": ""}
        WebChat.stop(user)
        last = list(gen)[-1]
        # Nothing was answered: no empty turn; the message is back in the box, the old answer kept.
        assert user.history == [("Q", "first")] and last[0] == to_messages(user.history)
        if text:
            assert last[2] == "R"
    assert fake.cancelled == 2


def test_failed_request_restores_the_message(demo: tuple[Any, Any]) -> None:
    class Full(FakeEngine):
        def submit(self, *a: Any) -> FakeRequest:
            raise QueueFull(3, 1.0)

    chat = WebChat(Full(["x"]), *demo)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="busy"):
        steps = run(chat.submit("keep me", None, "sys", chat.defaults))
    assert steps[-1][0] == [] and steps[-1][2] == "keep me" and steps[-1][1].history == []


# ------------------------------------------------------------------ handlers, real engine + demo model
def test_demo_model_through_the_engine(demo: tuple[Any, Any], engine: Engine) -> None:
    chat = WebChat(engine, *demo)
    settings = greedy(chat)
    steps = run(chat.submit("Hello", None, chat.system, settings))
    user = steps[-1][1]
    assert user.session.generation_config.do_sample is False
    assert len(user.history) == 1
    query, reply = user.history[0]
    assert query == "Hello" and reply.strip()
    streamed = [m[-1]["content"] for m, _, _ in steps[1:-1]]
    assert streamed and all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))  # it grows
    assert steps[-1][0] == to_messages(user.history)

    run(chat.regenerate(user, chat.system, settings))
    assert user.history == [("Hello", reply)]  # greedy: the same answer, and still one turn
    chat.clear(user)
    assert user.history == []


def test_create_web_app_builds_without_launching(demo: tuple[Any, Any], engine: Engine) -> None:
    import gradio as gr

    app = create_web_app(engine, *demo, title="Test page")
    assert isinstance(app, gr.Blocks)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and app.analytics_enabled is False
    chatbots = [b for b in app.blocks.values() if isinstance(b, gr.Chatbot)]
    assert len(chatbots) == 1 and chatbots[0].latex_delimiters == LATEX_DELIMITERS
    labels = {b.value for b in app.blocks.values() if isinstance(b, gr.Button)}
    assert {"Send", "Stop", "Regenerate", "Clear"} <= labels
    seeds = [b for b in app.blocks.values() if isinstance(b, gr.Number) and b.label == "Seed"]
    assert len(seeds) == 1 and seeds[0].value == -1  # the demo config has no seed: random answers


# ------------------------------------------------------------------ the page in headless Chromium
def _chromium() -> str | None:
    for name in (os.environ.get("QWEN_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set QWEN_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A launched app and a browser tab on it, with the few waits the tests need."""

    def __init__(self, browser: Any, app: Any) -> None:
        self.app = app
        self.url = f"http://127.0.0.1:{free_port()}"
        launch(app, port=int(self.url.rsplit(":", 1)[1]), block=False, quiet=True)
        self.outside: list[str] = []
        self.tab = browser.new_page(viewport={"width": 1000, "height": 900})
        self.tab.on("request", self._request)
        self.tab.goto(self.url)
        self.tab.wait_for_selector("#input textarea", timeout=60_000)
        # Every text the last assistant message shows, in order: proof of streaming.
        self.tab.evaluate("""() => {
            window.botTexts = [];
            const seen = () => {
                const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
                const t = bots.length ? bots[bots.length - 1].innerText.trim() : null;
                if (t !== null && window.botTexts[window.botTexts.length - 1] !== t) window.botTexts.push(t);
            };
            new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, characterData: true});
        }""")

    def _request(self, request: Any) -> None:
        if not request.url.startswith((self.url, "data:", "blob:")):
            self.outside.append(request.url)

    def send(self, text: str) -> None:
        self.tab.fill("#input textarea", text)
        self.tab.press("#input textarea", "Enter")

    def bots(self) -> list[str]:
        return [e.inner_text().strip() for e in self.tab.query_selector_all('#chatbot [data-testid="bot"]')]

    def users(self) -> list[str]:
        return [e.inner_text().strip() for e in self.tab.query_selector_all('#chatbot [data-testid="user"]')]

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no answer is in progress (Gradio hides the chatbot's progress tracker)."""
        self.tab.wait_for_function(
            """() => { const s = document.querySelector('#chatbot [data-testid="status-tracker"]');
                       return !s || s.classList.contains('hide'); }""", timeout=timeout * 1000)

    def wait_answer(self, n: int, timeout: float = 60) -> str:
        """The n-th assistant message, once it is non-empty and the answer is finished."""
        self.tab.wait_for_function(
            f"""() => {{ const b = document.querySelectorAll('#chatbot [data-testid="bot"]');
                        return b.length >= {n} && b[{n - 1}].innerText.trim().length > 0; }}""",
            timeout=timeout * 1000)
        self.wait_idle(timeout)
        return self.bots()[n - 1]

    def bot_texts(self) -> list[str]:
        return self.tab.evaluate("window.botTexts")

    def close(self) -> None:
        self.tab.close()
        self.app.close()


# Gradio's queue statistics use a pandas option that pandas 3 deprecates: not ours to fix.
browser_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")


@browser_warnings
def test_browser_chat_regenerate_clear(browser: Any, demo: tuple[Any, Any], engine: Engine,
                                       tmp_path: Path) -> None:
    page = Page(browser, create_web_app(engine, *demo, title="Qwen demo"))
    try:
        page.send("Hello")
        answer = page.wait_answer(1)
        assert answer and page.users() == ["Hello"]
        texts = [t for t in page.bot_texts() if t]
        assert texts[-1] == answer and all(answer.startswith(t) for t in texts)  # it only ever grew
        assert page.tab.input_value("#input textarea") == ""

        page.tab.get_by_text("System prompt and generation settings").click()  # show the controls too
        page.tab.wait_for_selector("text=Repetition penalty", state="visible")
        shot = tmp_path / "web-demo.png"
        page.tab.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("QWEN_SAVE_SCREENSHOT") == "1":
            shutil.copyfile(shot, REPO / "docs" / "web-demo.png")

        requests = engine.stats.requests
        page.tab.click("#regenerate")
        deadline = time.monotonic() + 30
        while engine.stats.requests == requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats.requests == requests + 1  # the last turn was asked again
        again = page.wait_answer(1)
        assert again and page.users() == ["Hello"] and len(page.bots()) == 1

        page.tab.click("#clear")
        page.tab.wait_for_function(
            "() => document.querySelectorAll('#chatbot [data-testid=\"user\"], #chatbot [data-testid=\"bot\"]')"
            ".length === 0", timeout=30_000)
        # Cleared for real: the next answer starts a new conversation.
        page.send("Hi")
        page.wait_answer(1)
        assert page.users() == ["Hi"]
        assert page.outside == []  # no analytics, fonts or anything else fetched from elsewhere
    finally:
        page.close()


@browser_warnings
def test_browser_rendering_streaming_and_stop(browser: Any, demo: tuple[Any, Any]) -> None:
    reply = ("Use <br> for a line break; prices $5 and $10; math $x^2$ and $$\\frac{1}{2}$$.\n\n"
             "```python\nprint('<b>')\n```\n")
    long_reply = "word " * 200
    fake = FakeEngine([reply, long_reply, "after stop"], piece=6, delay=0.03)
    page = Page(browser, create_web_app(fake, *demo))  # type: ignore[arg-type]
    try:
        page.tab.fill("#input textarea", "Show")
        page.tab.press("#input textarea", "Shift+Enter")  # a new line, not a send
        page.tab.type("#input textarea", "me")
        page.tab.press("#input textarea", "Enter")
        page.wait_answer(1)
        assert page.users() == ["Show\nme"]
        assert len(page.bot_texts()) >= 3  # streamed: several growing versions were on screen
        bot = page.tab.query_selector('#chatbot [data-testid="bot"]')
        text = bot.inner_text()
        assert "<br>" in text and "$5 and $10" in text and "print('<b>')" in text
        assert len(bot.query_selector_all(".katex")) >= 2 and bot.query_selector("pre code") is not None

        fake.delay = 0.05  # 200 events: about 10 s unless stopped
        page.send("Go on")
        page.tab.wait_for_function(
            """() => { const b = document.querySelectorAll('#chatbot [data-testid="bot"]');
                       return b.length >= 2 && b[1].innerText.includes('word word'); }""", timeout=30_000)
        page.tab.click("#stop")
        page.wait_idle(timeout=10)
        assert fake.cancelled == 1
        stopped = page.bots()[1]
        assert 0 < len(stopped) < len(long_reply.strip())
        page.send("Next")
        assert page.wait_answer(3) == "after stop"
        # The stopped, partial answer is part of the conversation the model sees.
        assert stopped in " ".join(demo[1].decode(fake.prompts[2]).split())
        assert page.outside == []
    finally:
        page.close()
