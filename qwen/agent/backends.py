"""Where the agent's completions come from: a local model, an OpenAI-compatible server, or a script.

A backend continues a :class:`~qwen.agent.react.ReactPrompt` (the open assistant turn included)
and returns the new text, cut before the first stop string (the stop string itself is not
returned, as OpenAI's ``stop`` does) or at ``<|im_end|>``. ``stream`` yields the same text in
pieces. Each backend sends the prompt its own way, and all three see the same conversation:

* :class:`LocalBackend` builds the ids as the server does for an open assistant turn: the ChatML
  ids of the closed turns (qwen.chat_template, each content encoded with special tokens off),
  then the assistant text so far encoded on its own. react_demo.py encodes the whole string in one
  go instead; the text is the same, a few ids at the turn boundaries can differ, and ours cannot be
  hijacked by a tool result that contains ``<|im_start|>``.
* :class:`OpenAIBackend` talks to ``qwen serve`` (or the official ``openai_api.py``) with chat
  completions: the closed turns as messages and, after a tool call, the assistant text so far as an
  assistant message followed by a ``function`` message with the latest observation. That is the
  servers' text-completion mode: they append ``"\\nObservation: {result}\\nThought:"`` and leave the
  assistant turn open, which is react_demo.py's concatenation. (The servers strip each message,
  so an observation's own leading newlines or trailing whitespace are dropped there.)
* :class:`ScriptedBackend` returns canned replies and records every prompt (for tests).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from ..chat_template import get_stop_words_ids, render_messages
from .react import ReactPrompt


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text before the earliest stop string."""
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


class ModelBackend:
    """Base class: implement ``stream`` or ``complete`` (each defaults to the other)."""

    def complete(self, prompt: ReactPrompt, stop: Sequence[str]) -> str:
        if type(self).stream is ModelBackend.stream:
            raise NotImplementedError(f"{type(self).__name__} implements neither complete() nor stream()")
        return "".join(self.stream(prompt, stop))

    def stream(self, prompt: ReactPrompt, stop: Sequence[str]) -> Iterator[str]:
        if type(self).complete is ModelBackend.complete:
            raise NotImplementedError(f"{type(self).__name__} implements neither complete() nor stream()")
        yield self.complete(prompt, stop)


# ---------------------------------------------------------------------------------------------- local
def prompt_ids(tokenizer: Any, prompt: ReactPrompt) -> list[int]:
    """ChatML ids of the prompt with the assistant turn left open (the same ids ``qwen serve`` builds)."""
    ids, _ = render_messages(tokenizer, prompt.messages(), add_generation_prompt=True, default_system=None)
    if prompt.assistant:
        ids += list(tokenizer.encode(prompt.assistant, allowed_special=set()))
    return ids


class LocalBackend(ModelBackend):
    """A model in this process: ``stream_generate`` with the stop strings and the ChatML stop ids.

    ``gen_kwargs`` are generation settings (max_new_tokens, do_sample, temperature, top_p, seed...);
    the default is greedy decoding, as react_demo.py sets ``top_k = 1``.
    """

    def __init__(self, model: Any, tokenizer: Any, **gen_kwargs: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.gen_kwargs = {"do_sample": False, **gen_kwargs}

    def stream(self, prompt: ReactPrompt, stop: Sequence[str]) -> Iterator[str]:
        from ..generate import stream_generate

        stop_ids = [list(s) for s in self.gen_kwargs.get("stop_words_ids") or []]
        stop_ids += get_stop_words_ids("chatml", self.tokenizer)
        kwargs = {k: v for k, v in self.gen_kwargs.items() if k != "stop_words_ids"}
        for r in stream_generate(self.model, self.tokenizer, prompt_ids(self.tokenizer, prompt),
                                 stop_strings=[s for s in stop if s], stop_words_ids=stop_ids, **kwargs):
            if r.text:
                yield r.text


class EngineBackend(ModelBackend):
    """The serving engine of ``qwen serve`` / ``qwen web`` (``qwen.serve.engine.Engine``, or a wrapper with
    its ``stream(prompt_ids, params)`` and ``Params``): agent turns are batched with other users' requests.

    ``settings`` are sampling settings (do_sample, temperature, top_p, top_k, repetition_penalty,
    max_new_tokens, seed); greedy by default, as react_demo.py.
    """

    def __init__(self, engine: Any, tokenizer: Any, **settings: Any) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = {"do_sample": False, **settings}

    def stream(self, prompt: ReactPrompt, stop: Sequence[str]) -> Iterator[str]:
        from ..sampling import SamplingParams

        ids = prompt_ids(self.tokenizer, prompt)
        s = dict(self.settings)
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"the agent's prompt ({len(ids)} tokens) does not fit the context of "
                             f"{self.engine.max_model_len} tokens")
        max_new = min(int(s.pop("max_new_tokens", None) or 512), room)
        seed = s.pop("seed", None)
        stop_ids = sorted({t[0] for t in get_stop_words_ids("chatml", self.tokenizer)}
                          | {self.tokenizer.eod_id})
        params = self.engine.Params(max_new_tokens=max_new, sampling=SamplingParams(**s), seed=seed,
                                    stop_token_ids=stop_ids, stop=[x for x in stop if x])
        for ev in self.engine.stream(ids, params):
            if ev.error:
                raise RuntimeError(ev.error)
            if ev.text:
                yield ev.text


# ---------------------------------------------------------------------------------------------- HTTP
class OpenAIBackend(ModelBackend):
    """An OpenAI-compatible server (``qwen serve``) through the ``openai`` package's chat completions.

    ``sampling`` goes into every request (default ``temperature=0``: greedy, as react_demo.py);
    e.g. ``max_tokens=512``, ``top_p``, ``seed``. ``client`` replaces the ``openai.OpenAI`` client.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000/v1", model: str = "qwen", api_key: str = "none", *,
                 client: Any = None, **sampling: Any) -> None:
        if client is None:
            try:
                import openai
            except ImportError as e:
                raise ImportError("OpenAIBackend needs the 'openai' package: pip install openai") from e
            client = openai.OpenAI(base_url=base_url, api_key=api_key)
        self.client = client
        self.model = model
        self.sampling = {"temperature": 0, **sampling}

    @staticmethod
    def messages(prompt: ReactPrompt) -> list[dict[str, str]]:
        """The request's messages: the closed turns, then the open assistant turn as assistant + function."""
        out = prompt.messages()
        if prompt.observation is not None:
            out.append({"role": "assistant", "content": prompt.scratchpad})
            out.append({"role": "function", "name": prompt.observation_tool or "tool", "content": prompt.observation})
        elif prompt.scratchpad:
            raise ValueError("an OpenAI-compatible server continues an assistant turn only after a tool result")
        return out

    def _create(self, prompt: ReactPrompt, stop: Sequence[str], stream: bool) -> Any:
        return self.client.chat.completions.create(model=self.model, messages=self.messages(prompt),
                                                   stop=[s for s in stop if s] or None, stream=stream,
                                                   **self.sampling)

    def complete(self, prompt: ReactPrompt, stop: Sequence[str]) -> str:
        r = self._create(prompt, stop, stream=False)
        # cut again: a server that ignores `stop` must not smuggle a made-up Observation in
        return cut_at_stop(r.choices[0].message.content or "", stop)

    def stream(self, prompt: ReactPrompt, stop: Sequence[str]) -> Iterator[str]:
        for chunk in self._create(prompt, stop, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


# ---------------------------------------------------------------------------------------------- tests
class ScriptedBackend(ModelBackend):
    """Canned model outputs, one per call, cut at the stop strings like a real backend's.

    A reply may be a string or a function of the prompt. ``prompts`` records every prompt received
    (``texts`` their react_demo.py strings); ``stream`` yields each reply in ``chunk_size`` pieces.
    """

    def __init__(self, replies: Sequence[str | Callable[[ReactPrompt], str]], chunk_size: int = 3) -> None:
        self.replies = list(replies)
        self.chunk_size = max(1, chunk_size)
        self.prompts: list[ReactPrompt] = []
        self.stops: list[list[str]] = []

    @property
    def texts(self) -> list[str]:
        return [p.text() for p in self.prompts]

    def complete(self, prompt: ReactPrompt, stop: Sequence[str]) -> str:
        n = len(self.prompts)
        if n >= len(self.replies):
            raise IndexError(f"ScriptedBackend has {len(self.replies)} replies; call {n + 1} asked for another")
        self.prompts.append(prompt)
        self.stops.append(list(stop))
        reply = self.replies[n]
        return cut_at_stop(reply(prompt) if callable(reply) else reply, stop)

    def stream(self, prompt: ReactPrompt, stop: Sequence[str]) -> Iterator[str]:
        text = self.complete(prompt, stop)
        for start in range(0, len(text), self.chunk_size):
            yield text[start:start + self.chunk_size]
