"""Chat on top of generation: the official ``chat``/``chat_stream`` API and a reusable ChatSession.

chat() reproduces the official model.chat (spec §8.4): ChatML prompt via make_context, stop words
<|im_end|>/<|im_start|> (eos appended after them), decode_tokens with errors="replace", and a
copied history. ChatSession is what the CLI demo, the web demo and the server share: it keeps the
history, system prompt and generation settings, and reuses the KV cache across turns.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Sequence

import torch

from .chat_template import DEFAULT_SYSTEM, HistoryType, decode_tokens, get_stop_words_ids, make_context
from .config import ntk_alpha
from .generate import (
    GenerationConfig,
    GenerationResponse,
    _as_generation_config,
    _decodable_guard,
    generate,
    stream_generate,
)

_SENTINEL = object()

_ERROR_STREAM_IN_CHAT = (
    "chat(stream=True) is deprecated (as in the official code). Use chat_stream(...) for cumulative "
    "text, or ChatSession(...).send(query, stream=True) for text deltas."
)
_ERROR_BAD_CHAT_FORMAT = (
    "chat() needs a chat model (generation_config.chat_format == 'chatml', e.g. Qwen-7B-Chat), but "
    "chat_format is {fmt!r}. A base (pretrained) model has chat_format 'raw' and was not trained to "
    "chat: use generate()/stream_generate() with your own prompt instead, or pass a chatml "
    "generation_config if this really is a chat model."
)


def _chat_config(model: Any, generation_config: Any) -> GenerationConfig:
    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    cfg = _as_generation_config(base).copy() if base is not None else GenerationConfig()
    if cfg.chat_format != "chatml":
        raise ValueError(_ERROR_BAD_CHAT_FORMAT.format(fmt=cfg.chat_format))
    return cfg


def _history(history: Sequence[Sequence[str]] | None) -> HistoryType:
    # Deep copy: the caller's list (and its entries) are never touched.
    return [tuple(turn) for turn in copy.deepcopy(list(history or []))]  # type: ignore[misc]


def _turn_prompt(
    tokenizer: Any, query: str, history: HistoryType, system: str, cfg: GenerationConfig,
    max_window_size: int | None, stop_words_ids: Sequence[Sequence[int]] | None,
) -> tuple[str, list[int], list[list[int]]]:
    """(raw_text, context ids, stop words) for one turn, as the official chat builds them."""
    raw_text, context_tokens = make_context(
        tokenizer, query, history=history, system=system, max_window_size=max_window_size or cfg.max_window_size,
        chat_format=cfg.chat_format,
    )
    stops = [list(s) for s in stop_words_ids or []] + get_stop_words_ids(cfg.chat_format, tokenizer)
    return raw_text, context_tokens, stops


def chat(
    model: Any,
    tokenizer: Any,
    query: str,
    history: Sequence[Sequence[str]] | None = None,
    system: str = DEFAULT_SYSTEM,
    stream: Any = _SENTINEL,
    stop_words_ids: list[list[int]] | None = None,
    generation_config: GenerationConfig | dict | None = None,
    **kwargs: Any,
) -> tuple[str, HistoryType]:
    """One chat turn, as the official ``model.chat``: returns (response, history + [(query, response)]).

    kwargs override generation settings (top_p=..., do_sample=False, max_new_tokens=..., seed=...);
    ``max_window_size`` bounds the history kept in the prompt.
    """
    if stream is not _SENTINEL:
        raise ValueError(_ERROR_STREAM_IN_CHAT)
    cfg = _chat_config(model, generation_config)
    history = _history(history)
    raw_text, context_tokens, stops = _turn_prompt(tokenizer, query, history, system, cfg,
                                                   kwargs.pop("max_window_size", None), stop_words_ids)
    processors = list(kwargs.pop("logits_processor", None) or []) + _decodable_guard(model, tokenizer)
    input_ids = torch.tensor([context_tokens], dtype=torch.long, device=model.device)
    outputs = generate(model, input_ids, generation_config=cfg, stop_words_ids=stops, logits_processor=processors,
                       return_dict_in_generate=False, **kwargs)
    response = decode_tokens(outputs[0], tokenizer, raw_text_len=len(raw_text), context_length=len(context_tokens),
                             chat_format=cfg.chat_format, verbose=False, errors="replace")
    history.append((query, response))
    return response, history


def chat_stream(
    model: Any,
    tokenizer: Any,
    query: str,
    history: Sequence[Sequence[str]] | None = None,
    system: str = DEFAULT_SYSTEM,
    stop_words_ids: list[list[int]] | None = None,
    logits_processor: Sequence[Any] | None = None,
    generation_config: GenerationConfig | dict | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Stream one chat turn as the official ``model.chat_stream``: yields the cumulative response.

    Each value is the whole reply so far (stripped, so the last one equals chat()'s response); it
    never ends inside a UTF-8 character. History is not updated.
    """
    cfg = _chat_config(model, generation_config)
    _, context_tokens, stops = _turn_prompt(tokenizer, query, _history(history), system, cfg,
                                            kwargs.pop("max_window_size", None), stop_words_ids)

    def gen() -> Iterator[str]:
        text, shown, yielded = "", "", False
        for r in stream_generate(model, tokenizer, context_tokens, generation_config=cfg, stop_words_ids=stops,
                                 logits_processor=logits_processor, **kwargs):
            text += r.text
            if text.strip() != shown:
                shown, yielded = text.strip(), True
                yield shown
        if not yielded:  # an empty reply still yields once
            yield ""

    return gen()


class ChatSession:
    """A conversation: history, system prompt and generation settings, plus a KV cache kept across turns.

        session = ChatSession(model, tokenizer)
        reply = session.send("Hi!")                      # -> str, history updated
        for delta in session.send("More", stream=True):  # -> text deltas; history updated at the end
            print(delta, end="")

    Each turn builds the same prompt as chat() (make_context with the history). The cache keeps the
    tokens of the previous turn; the new prompt's common prefix with them is not recomputed.
    ``last_response`` holds the final GenerationResponse (finish_reason, token counts, speed).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system: str = DEFAULT_SYSTEM,
        history: Sequence[Sequence[str]] | None = None,
        generation_config: GenerationConfig | dict | None = None,
        stop_words_ids: list[list[int]] | None = None,
        reuse_cache: bool = True,
        engine: Any = None,
    ) -> None:
        self.engine = engine  # a started serve.engine.Engine: generate there (batched with other users)
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.history: HistoryType = _history(history)
        self.generation_config = _chat_config(model, generation_config)
        self.stop_words_ids = [list(s) for s in stop_words_ids or []]
        self.reuse_cache = reuse_cache
        self.last_response: GenerationResponse | None = None
        self._cache: Any = None
        self._cache_ids: list[int] = []

    def set_config(self, **kwargs: Any) -> None:
        """Change generation settings for later turns (GenerationConfig fields; unknown keys raise)."""
        trial = self.generation_config.copy()
        unknown = trial.update(**kwargs)
        if unknown:
            raise ValueError(f"unknown generation settings {sorted(unknown)}")
        if trial.chat_format != "chatml":
            raise ValueError(_ERROR_BAD_CHAT_FORMAT.format(fmt=trial.chat_format))
        self.generation_config = trial

    def clear(self) -> None:
        """Forget the history (and the cached tokens)."""
        self.history = []
        self._cache, self._cache_ids = None, []

    def _prepare_cache(self, ids: list[int], max_new_tokens: int) -> Any:
        cfg = self.model.config
        cache = self._cache
        if self.reuse_cache and cache is not None:
            n = 0
            for a, b in zip(self._cache_ids, ids):
                if a != b:
                    break
                n += 1
            n = min(n, len(ids) - 1)  # at least one token must be prefilled to get logits
            # A fresh prefill would choose its own dynamic-NTK alpha; reuse only if it is the same.
            same_alpha = cache.ntk_alpha is None or cache.ntk_alpha == [float(ntk_alpha(len(ids), cfg.seq_length))]
            # Window attention: the rings of windowed layers may no longer hold what a rewind needs.
            if n > 0 and same_alpha and getattr(cache, "can_crop", lambda _: True)(n):
                cache.crop(n)
                return cache
        self._cache = self.model.new_cache(1, len(ids) + max_new_tokens)
        return self._cache

    def stream(self, query: str, **overrides: Any) -> Iterator[GenerationResponse]:
        """One turn as GenerationResponse records (see stream_generate); history updated at the end."""
        cfg = self.generation_config.copy()
        unknown = cfg.update(**{k: v for k, v in overrides.items() if v is not None})
        if unknown:
            raise ValueError(f"unknown generation settings {sorted(unknown)}")
        _, ids, stops = _turn_prompt(self.tokenizer, query, self.history, self.system, cfg, None, self.stop_words_ids)
        if self.engine is not None:
            yield from self._stream_engine(query, ids, stops, cfg)
            return
        cache = self._prepare_cache(ids, cfg.max_new_tokens or 512)
        self._cache_ids = []  # invalid until this turn completes
        generated: list[int] = []
        text = ""
        for r in stream_generate(self.model, self.tokenizer, ids, generation_config=cfg, stop_words_ids=stops,
                                 cache=cache):
            if r.token is not None:
                generated.append(r.token)
            text += r.text
            if r.finish_reason is not None:
                self.last_response = r
            yield r
        self._cache_ids = (ids + generated)[: cache.length]
        self.history.append((query, text.strip()))

    def _stream_engine(self, query: str, ids: list[int], stops: list[list[int]], cfg: GenerationConfig,
                       ) -> Iterator[GenerationResponse]:
        from .sampling import SamplingParams

        stop_ids = sorted({s[0] for s in stops if len(s) == 1} | set(cfg.eos_token_ids or []))
        stop_text = [self.tokenizer.decode(s) for s in stops if len(s) > 1] + list(cfg.stop_strings or [])
        params = self.engine.Params(
            max_new_tokens=min(cfg.max_new_tokens or 512, self.engine.max_model_len - len(ids)),
            sampling=SamplingParams(do_sample=cfg.do_sample, temperature=cfg.temperature, top_k=cfg.top_k,
                                    top_p=cfg.top_p, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                                    presence_penalty=cfg.presence_penalty, frequency_penalty=cfg.frequency_penalty),
            seed=cfg.seed, stop_token_ids=stop_ids, stop=stop_text)
        text = ""
        for ev in self.engine.stream(ids, params):
            if ev.error:
                raise RuntimeError(ev.error)
            text += ev.text
            r = GenerationResponse(text=ev.text, token=ev.token_ids[-1] if ev.token_ids else None,
                                   finish_reason=ev.finish_reason, prompt_tokens=len(ids),
                                   generation_tokens=ev.completion_tokens)
            if r.finish_reason is not None:
                self.last_response = r
            yield r
        self.history.append((query, text.strip()))

    def send(self, query: str, stream: bool = False, **overrides: Any) -> str | Iterator[str]:
        """Ask ``query``. Returns the reply, or with stream=True an iterator of text deltas (leading
        whitespace dropped, so the deltas join to the stored reply up to trailing whitespace)."""
        if not stream:
            return "".join(r.text for r in self.stream(query, **overrides)).strip()

        def deltas() -> Iterator[str]:
            started = False
            for r in self.stream(query, **overrides):
                text = r.text if started else r.text.lstrip()
                if text:
                    started = True
                    yield text

        return deltas()
