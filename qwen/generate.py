"""Text generation in layers, each a thin wrapper over the one below.

  sampling.py      logits transforms and the draw (pure functions)
  generate_step    prefill once into a preallocated KVCache, then one token per step; owns eos,
                   stop-word, padding and budget bookkeeping for a batch of rows
  generate         HF-style: returns prompt + new ids [B, T+N]; streamer protocol; stop strings
  stream_generate  one prompt -> GenerationResponse records with UTF-8-safe text deltas that never
                   leak a stop string, ending with finish_reason and speed statistics
chat() / ChatSession (chat.py) sit on top. The model is only ever called as
``model(ids, attention_mask, past_key_values=cache, logits_to_keep=1)``, or, with ``compile``, through
the static-shape graphs of qwen/compiled.py (CUDA by default; the token loop then syncs every few steps).
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .generation_config import (  # noqa: F401  (re-exported: qwen.generate.GenerationConfig is public)
    GENERATION_CONFIG_NAME,
    LogitsProcessor,
    StoppingCriterion,
    GenerationConfig,
    PRESETS,
    QWEN_14B_CHAT,
    QWEN_7B_BASE,
    QWEN_7B_CHAT,
    _as_generation_config,
    _id_list,
    resolve_generation_config,
)
from .sampling import SamplingParams, apply_penalties, sample, token_counts, warp

logger = logging.getLogger(__name__)
SYNC_EVERY = 8  # compiled loop: device steps between host reads of the drawn ids

# ----------------------------------------------------------------------------------------------- token loop
@dataclass
class TokenStep:
    """What generate_step yields once per step."""

    tokens: torch.Tensor  # [B] the id appended to each row (pad, or the owed eos, for finished rows)
    finished: torch.Tensor  # [B] bool: the row is complete after this step
    finish_reasons: list[str | None]  # per row: "stop" | "length" once finished, else None
    scores: torch.Tensor | None = None  # [B, V] processed logits the tokens were drawn from (None: no forward)


def _ends_with(tail: list[int], seqs: list[list[int]]) -> bool:
    return any(len(tail) >= len(s) and tail[len(tail) - len(s):] == s for s in seqs)


class _Rows:
    """Per-row bookkeeping on the host, shared by the eager and the compiled token loops: tails of real ids
    for stop-word matching (prompt included, as the official processor matches the whole sequence),
    done flags, owed eos and finish reasons."""

    def __init__(self, input_ids: torch.Tensor, real: torch.Tensor, stops: list[list[int]], eos_ids: list[int],
                 eos: int | None, pad: int) -> None:
        self.stops, self.eos_ids, self.eos, self.pad = stops, eos_ids, eos, pad
        self.max_stop = max((len(s) for s in stops), default=0)
        b = input_ids.shape[0]
        rows_cpu, real_cpu = input_ids.tolist(), real.tolist()
        self.tails = [[tok for tok, r in zip(row, m) if r][-self.max_stop:] if self.max_stop else []
                      for row, m in zip(rows_cpu, real_cpu)]
        self.done = [False] * b
        self.owe = [False] * b
        self.reasons: list[str | None] = [None] * b
        for i in range(b):
            if stops and _ends_with(self.tails[i], stops):  # the official would force eos right away
                self.done[i], self.owe[i], self.reasons[i] = True, eos is not None, "stop"

    def advance(self, drawn: list[int] | None) -> list[int]:
        """The ids this step appends, given the ids drawn for each row (None: no forward ran, all rows done)."""
        toks = []
        for i in range(len(self.done)):
            if self.done[i]:
                tok = self.eos if self.owe[i] else self.pad
                self.owe[i] = False
            else:
                assert drawn is not None
                tok = int(drawn[i])
                if self.max_stop:
                    self.tails[i].append(tok)
                    del self.tails[i][:-self.max_stop]
                if tok in self.eos_ids:
                    self.done[i], self.reasons[i] = True, "stop"
                elif self.stops and _ends_with(self.tails[i], self.stops):
                    self.done[i], self.owe[i], self.reasons[i] = True, self.eos is not None, "stop"
            toks.append(tok)  # type: ignore[arg-type]
        return toks  # type: ignore[return-value]

    def criteria(self, stopping_criteria: Sequence[StoppingCriterion], seq: torch.Tensor,
                 scores: torch.Tensor | None) -> None:
        if not stopping_criteria or all(self.done):
            return
        b = len(self.done)
        hit = torch.zeros(b, dtype=torch.bool)
        for crit in stopping_criteria:
            hit |= torch.as_tensor(crit(seq, scores)).bool().cpu().expand(b)
        for i in range(b):
            if hit[i] and not self.done[i]:
                self.done[i], self.reasons[i] = True, "stop"

    def budget_spent(self) -> None:
        for i in range(len(self.done)):
            if not self.done[i]:
                self.done[i], self.reasons[i] = True, "length"

    def step(self, scores: torch.Tensor | None, tokens: torch.Tensor) -> TokenStep:
        return TokenStep(tokens, torch.tensor(self.done), list(self.reasons), scores)

    @property
    def over(self) -> bool:
        return all(self.done) and not any(self.owe)


@torch.no_grad()
def generate_step(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_words_ids: Sequence[Sequence[int]] | None = None,
    logits_processor: Sequence[LogitsProcessor] = (),
    stopping_criteria: Sequence[StoppingCriterion] = (),
    generator: torch.Generator | None = None,
    cache: Any = None,
    compile: bool | str = "auto",
    sync_every: int = SYNC_EVERY,
) -> Iterator[TokenStep]:
    """Decode up to ``max_new_tokens`` for a batch of (left-padded) prompts, one TokenStep per step.

    Per step and row: penalties -> logits_processor -> warpers -> draw. A row finishes when it draws
    an eos id, when its sequence ends with a stop-word sequence (then, budget permitting, eos is
    appended on the next step without a forward pass: the official StopWordsLogitsProcessor would
    force exactly that token), when a stopping criterion fires, or at the budget. Finished rows are
    padded with ``pad_token_id`` (default: eos) while others continue; iteration ends once every row
    is done. ``cache``, if given, must hold a prefix of ``input_ids`` (unpadded): only the rest is
    prefilled; by default a cache for prompt + max_new_tokens is allocated.

    ``compile`` (qwen/compiled.py): True runs prefill and decode steps through compiled static-shape
    graphs, False the eager model, "auto" (default) compiles on CUDA only (QWEN_COMPILE=0/1 overrides).
    The compiled loop draws tokens on the device and reads them on the host every ``sync_every`` steps
    (every step with logits processors or stopping criteria, which look at each step's sequence), so
    its TokenSteps arrive in bursts; what they hold is what the eager loop would yield.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = model.device
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    if t == 0:
        raise ValueError("generation needs at least one prompt token")
    eos_ids = _id_list(eos_token_id)
    eos = eos_ids[0] if eos_ids else None
    pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
    # As the official processor: a stop sequence equal to [eos] is redundant and dropped.
    stops = [list(s) for s in (stop_words_ids or []) if len(s) and not (len(s) == 1 and s[0] in eos_ids)]

    padded = False
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("right padding detected: decoder-only generation needs left padding "
                             "(tokenizer(..., padding_side='left'))")
        padded = not bool(attention_mask.all())
    decoder = _compiled_decoder(model, compile, cache, b, t, max_new_tokens)
    if decoder is None:
        if cache is None:
            cache = model.new_cache(b, t + max_new_tokens)
        start = cache.length
        if start >= t or (start and padded):
            raise ValueError(
                f"a reused cache must hold a strict prefix of an unpadded prompt (cache {start}, prompt {t})")
        if start:
            cache.reserve(t - start + max_new_tokens)
    else:
        start = 0

    vocab = model.config.vocab_size
    real = attention_mask.bool() if padded else torch.ones_like(input_ids, dtype=torch.bool)
    seen = token_counts(input_ids, vocab, real) if params.needs_seen else None
    out_counts = (torch.zeros(b, vocab, dtype=torch.int32, device=device) if params.needs_output_counts else None)
    seq = torch.full((b, t + max_new_tokens), pad, dtype=torch.long, device=device)
    seq[:, :t] = input_ids
    rows = _Rows(input_ids, real, stops, eos_ids, eos, pad)
    arange = torch.arange(b, device=device)

    def count(tokens: torch.Tensor) -> None:
        if seen is not None:
            seen.index_put_((arange, tokens), torch.ones_like(tokens, dtype=seen.dtype), accumulate=True)
        if out_counts is not None:
            out_counts.index_put_((arange, tokens), torch.ones_like(tokens, dtype=out_counts.dtype), accumulate=True)

    def draw(logits: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # .to(device): with layers spread over devices the logits come back on the last one.
        scores = apply_penalties(logits.float().to(device), params, seen, out_counts)
        for proc in logits_processor:
            scores = proc(seq[:, : t + step], scores)
        scores = warp(scores, params)
        return scores, sample(scores, not params.greedy, generator)

    if decoder is not None:
        # Processors that read the sequence, and stopping criteria, need each step's tokens on the host.
        per_step = stopping_criteria or any(getattr(p, "reads_sequence", True) for p in logits_processor)
        yield from _compiled_steps(decoder, input_ids, attention_mask if padded else None, max_new_tokens, rows,
                                   seq, t, draw, count, stopping_criteria, 1 if per_step else max(1, sync_every))
        return

    last: torch.Tensor | None = None
    for step in range(max_new_tokens):
        scores = None
        drawn = None
        if not all(rows.done):
            if step == 0:
                out = model(input_ids[:, start:], attention_mask=attention_mask if padded else None,
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                out = model(last[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            scores, ids = draw(out.logits[:, -1], step)
            drawn = ids.tolist()
        tokens = torch.tensor(rows.advance(drawn), dtype=torch.long, device=device)
        seq[:, t + step] = tokens
        count(tokens)
        rows.criteria(stopping_criteria, seq[:, : t + step + 1], scores)
        if step == max_new_tokens - 1:
            rows.budget_spent()
        yield rows.step(scores, tokens)
        if rows.over:
            return
        last = tokens


def _compiled_decoder(model: Any, compile: bool | str, cache: Any, b: int, t: int, max_new_tokens: int) -> Any:
    """The CompiledDecoder this generation runs on, or None for the eager path."""
    if max_new_tokens <= 0:
        return None
    from . import compiled

    if not compiled.wants_compile(model, compile, cache):
        return None
    if compile is True:
        decoder = compiled.decoder_for(model, b, t, max_new_tokens)
        if decoder is None:  # another generation holds the shared one: a private decoder (compiles again)
            decoder = compiled.CompiledDecoder(model, b, compiled.capacity_for(t, max_new_tokens),
                                               **compiled.DEFAULT_OPTIONS)
            decoder.busy = True
        return decoder
    decoder = None
    try:  # "auto": a model whose graphs cannot be built runs eagerly (once warned, never retried)
        decoder = compiled.decoder_for(model, b, t, max_new_tokens)
        if decoder is not None:
            decoder.warm_up(t)
        return decoder  # None (busy with another generation): this one runs eagerly
    except Exception as e:  # noqa: BLE001 (torch.compile raises many kinds; none should stop generation)
        logger.warning("compile='auto': the compiled path failed for this model, generating eagerly (%s: %s)",
                       type(e).__name__, e)
        if decoder is not None:
            decoder.release()
        compiled.mark_failed(model)
        return None


def _compiled_steps(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    max_new_tokens: int, rows: _Rows, seq: torch.Tensor, t: int, draw: Any, count: Any,
                    stopping_criteria: Sequence[StoppingCriterion], sync_every: int) -> Iterator[TokenStep]:
    """The token loop on a CompiledDecoder: forward, draw and count on the device for ``sync_every`` steps,
    then one host read of the drawn ids and the eager loop's bookkeeping for each of those steps.

    A row's forward after it finished (the eager loop feeds it pad or eos) is computed on whatever it
    drew and discarded; rows never see each other, so the other rows' tokens are the same.
    """
    try:
        yield from _compiled_loop(decoder, input_ids, attention_mask, max_new_tokens, rows, seq, t, draw, count,
                                  stopping_criteria, sync_every)
    finally:
        decoder.release()


def _compiled_loop(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   max_new_tokens: int, rows: _Rows, seq: torch.Tensor, t: int, draw: Any, count: Any,
                   stopping_criteria: Sequence[StoppingCriterion], sync_every: int) -> Iterator[TokenStep]:
    device = seq.device
    step = 0
    feed: torch.Tensor | None = None
    while step < max_new_tokens:
        chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not all(rows.done):
            for j in range(step, min(step + sync_every, max_new_tokens)):
                logits = decoder.prefill(input_ids, attention_mask) if j == 0 else decoder.decode(feed)
                scores, feed = draw(logits, j)
                count(feed)
                chunk.append((scores, feed))
        drawn = torch.stack([ids for _, ids in chunk], dim=1).tolist() if chunk else []
        for j in range(max(1, len(chunk))):
            forward = not all(rows.done)
            scores = chunk[j][0] if forward and chunk else None
            tokens = torch.tensor(rows.advance([row[j] for row in drawn] if forward else None),
                                  dtype=torch.long, device=device)
            seq[:, t + step] = tokens
            rows.criteria(stopping_criteria, seq[:, : t + step + 1], scores)
            if step == max_new_tokens - 1:
                rows.budget_spent()
            yield rows.step(scores, tokens)
            step += 1
            if rows.over:
                return


# ----------------------------------------------------------------------------------------------- text helpers
class StreamingDetokenizer:
    """Incremental decoding that never cuts a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix gives a
    trailing U+FFFD. Pending ids are held back until they decode cleanly, and text is committed only
    at character boundaries, so ``text`` always equals decode(all ids committed so far).
    """

    MAX_PENDING = 32  # past this the bytes cannot be a split character: flush (invalid UTF-8)

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.decode_kwargs = {k: v for k, v in decode_kwargs.items() if k != "errors"}
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.tokens: list[int] = []
        self._pending: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        # errors="replace" is what makes an incomplete tail visible (as U+FFFD).
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, errors="replace",
                                     **self.decode_kwargs)

    def _commit(self, n: int, text: str) -> str:
        self._pending = self._pending[n:]
        self.text += text
        return text

    def add(self, token_id: int) -> str:
        """Append one id; return the newly committed text ("" while a character is incomplete)."""
        self.tokens.append(int(token_id))
        self._pending.append(int(token_id))
        text = self._decode(self._pending)
        if not text.endswith("\ufffd") or len(self._pending) > self.MAX_PENDING:
            return self._commit(len(self._pending), text)
        # Commit the longest prefix that ends on a character boundary, keep the rest pending.
        for k in range(len(self._pending) - 1, 0, -1):
            head = self._decode(self._pending[:k])
            if not head.endswith("\ufffd"):
                return self._commit(k, head)
        return ""

    def finalize(self) -> str:
        """Flush whatever is pending (an incomplete character decodes to U+FFFD)."""
        if not self._pending:
            return ""
        return self._commit(len(self._pending), self._decode(self._pending))


def _stop_holdback(text: str, start: int, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text) - start), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _find_stop(text: str, start: int, stop_strings: Sequence[str]) -> int:
    """Index of the earliest stop string occurrence at or after ``start``, or -1."""
    hits = [i for i in (text.find(s, start) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else -1


class StopStringCriteria:
    """Stopping criterion: a row stops once its decoded new text contains one of ``stop_strings``.

    Stateful (one detokenizer per row), so use one instance per generate() call.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self._detok: list[StreamingDetokenizer] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        if not self._detok:
            self._detok = [StreamingDetokenizer(self.tokenizer, skip_special_tokens=False)
                           for _ in range(input_ids.shape[0])]
        longest = max((len(s) for s in self.stop_strings), default=0)
        hit = []
        for det, tok in zip(self._detok, input_ids[:, -1].tolist()):
            before = len(det.text)
            det.add(tok)
            hit.append(_find_stop(det.text, max(0, before - longest + 1), self.stop_strings) >= 0)
        return torch.tensor(hit, dtype=torch.bool)


def tokenizer_vocab_limit(tokenizer: Any) -> int | None:
    """Number of ids the tokenizer can decode (151851 for Qwen), if it tells."""
    try:
        return int(len(tokenizer))
    except TypeError:
        n = getattr(tokenizer, "vocab_size", None)
        return int(n) if n else None


def suppress_ids_from(first_invalid: int) -> LogitsProcessor:
    """A processor banning ids >= first_invalid: the embedding is padded (151936 rows) past the
    tokenizer's 151851 ids, and those ids cannot be decoded."""

    def processor(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()  # may alias the model's logits
        scores[..., first_invalid:] = float("-inf")
        return scores

    processor.reads_sequence = False  # type: ignore[attr-defined]  (the compiled loop need not sync per step)
    return processor


def _decodable_guard(model: Any, tokenizer: Any) -> list[LogitsProcessor]:
    limit = tokenizer_vocab_limit(tokenizer)
    return [suppress_ids_from(limit)] if limit and limit < model.config.vocab_size else []


# ----------------------------------------------------------------------------------------------- generate()
@dataclass
class GenerateOutput:
    """What generate(return_dict_in_generate=True) returns."""

    sequences: torch.Tensor
    finish_reasons: list[str | None] = field(default_factory=list)


def _budget(cfg: GenerationConfig, prompt_len: int, max_new_tokens: int | None, max_length: int | None) -> int:
    # Explicit arguments beat the config; max_new_tokens beats max_length, as in HF.
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is not None:
        return max(0, max_length - prompt_len)
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    if cfg.max_length is not None:
        return max(0, cfg.max_length - prompt_len)
    return 512


def generate(
    model: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | dict | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    stop_words_ids: list[list[int]] | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    seed: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    tokenizer: Any = None,
    logits_processor: Sequence[LogitsProcessor] | None = None,
    return_dict_in_generate: bool = False,
    compile: bool | str = "auto",
    **ignored_hf_kwargs: Any,
) -> torch.Tensor | GenerateOutput:
    """Generate continuations like HF/official ``model.generate``: returns prompt + new ids [B, T+N].

    Arguments override ``generation_config`` (default: model.generation_config, else defaults);
    other GenerationConfig fields (min_p, presence_penalty, max_length, ...) may be passed as
    keywords too. Batches must be left-padded (attention_mask 0 on pads); each row then decodes as
    it would alone. ``seed`` makes sampling reproducible through a private torch.Generator; without
    it torch's global RNG is used. ``stop_strings`` need ``tokenizer``. ``streamer`` follows HF's
    protocol: put(prompt ids), put(new ids [B]) per step, end(). ``compile``: True / False / "auto"
    (CUDA only), see :func:`generate_step`; outputs are the same either way, up to floating point.
    """
    if input_ids is None:
        input_ids = ignored_hf_kwargs.pop("inputs", None)
    if input_ids is None:
        raise ValueError("generate() needs input_ids")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).reshape(input_ids.shape)
    max_length = ignored_hf_kwargs.pop("max_length", None)
    stopping_criteria = list(ignored_hf_kwargs.pop("stopping_criteria", None) or [])
    cfg, unknown = resolve_generation_config(
        model, generation_config, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, stop_words_ids=stop_words_ids, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, seed=seed, stop_strings=stop_strings, **ignored_hf_kwargs,
    )
    for name in ("num_beams", "num_return_sequences"):
        if unknown.pop(name, 1) not in (1, None):
            raise NotImplementedError(f"{name} > 1 is not supported (sampling or greedy decoding only)")
    if unknown:
        logger.debug("generate() ignores %s", sorted(unknown))

    b, t = input_ids.shape
    budget = _budget(cfg, t, max_new_tokens, max_length)
    if attention_mask is None and cfg.pad_token_id is not None and cfg.pad_token_id not in cfg.eos_token_ids:
        # HF infers the mask from pad ids when pad != eos.
        if bool((input_ids == cfg.pad_token_id).any()):
            attention_mask = (input_ids != cfg.pad_token_id).long()
    strings = [cfg.stop_strings] if isinstance(cfg.stop_strings, str) else list(cfg.stop_strings or [])
    if strings:
        if tokenizer is None:
            raise ValueError("stop_strings need tokenizer= to decode the generated ids")
        stopping_criteria.append(StopStringCriteria(tokenizer, strings))
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(cfg.seed))

    steps = generate_step(
        model, input_ids, attention_mask, max_new_tokens=budget, params=cfg.sampling_params(),
        eos_token_id=cfg.eos_token_ids, pad_token_id=cfg.pad_token_id, stop_words_ids=cfg.stop_words_ids,
        logits_processor=list(logits_processor or []), stopping_criteria=stopping_criteria, generator=generator,
        compile=compile,
    )
    new: list[torch.Tensor] = []
    reasons: list[str | None] = [None] * b
    try:
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for step in steps:
            new.append(step.tokens)
            reasons = step.finish_reasons
            if streamer is not None:
                streamer.put(step.tokens.cpu())
    finally:
        if streamer is not None:
            streamer.end()
    out = input_ids.to(model.device)
    if new:
        out = torch.cat([out, torch.stack(new, dim=1)], dim=1)
    return GenerateOutput(out, reasons) if return_dict_in_generate else out


# ----------------------------------------------------------------------------------------------- streaming
@dataclass
class GenerationResponse:
    """One record of stream_generate: a text delta for one generated token, plus running statistics.

    The last record has ``finish_reason`` ("stop" or "length") and carries any held-back text.
    """

    text: str
    token: int | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from a reused KV cache
    generation_tokens: int = 0
    prompt_tps: float = 0.0  # prefill speed (prompt tokens computed / time to first token)
    generation_tps: float = 0.0  # decode speed after the first token
    stop_string: str | None = None  # which stop string ended generation, if one did


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    generation_config: GenerationConfig | dict | None = None,
    stop_strings: Sequence[str] | str | None = None,
    skip_special_tokens: bool = True,
    logits_processor: Sequence[LogitsProcessor] | None = None,
    cache: Any = None,
    compile: bool | str = "auto",
    **overrides: Any,
) -> Iterator[GenerationResponse]:
    """Generate from one prompt, yielding a GenerationResponse per token.

    Text deltas never end inside a UTF-8 character and never contain (any prefix of) a stop
    string: a suffix that could start one is held back until it is ruled out. Generation ends at
    eos, a stop-word id sequence, a stop string (the text stops before it) or the budget. The eos
    id's own text is not emitted; with skip_special_tokens other special tokens decode to "".
    ``overrides`` are GenerationConfig fields (max_new_tokens, temperature, stop_words_ids, seed...).
    Ids the tokenizer cannot decode (embedding padding) are never sampled. ``compile``: as in
    :func:`generate_step` (a reused ``cache`` always runs eagerly under "auto").
    """
    if isinstance(prompt, str):
        prompt_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    else:
        prompt_ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    cfg, unknown = resolve_generation_config(model, generation_config, stop_strings=stop_strings, **overrides)
    if unknown:
        raise TypeError(f"stream_generate() got unknown generation arguments {sorted(unknown)}")
    strings = [cfg.stop_strings] if isinstance(cfg.stop_strings, str) else [s for s in cfg.stop_strings or [] if s]
    t = prompt_ids.shape[1]
    cached = cache.length if cache is not None else 0
    budget = _budget(cfg, t, None, None)
    generator = torch.Generator(device=model.device).manual_seed(int(cfg.seed)) if cfg.seed is not None else None
    eos_ids = set(cfg.eos_token_ids)

    steps = generate_step(
        model, prompt_ids, max_new_tokens=budget, params=cfg.sampling_params(), eos_token_id=cfg.eos_token_ids,
        pad_token_id=cfg.pad_token_id, stop_words_ids=cfg.stop_words_ids,
        logits_processor=list(logits_processor or []) + _decodable_guard(model, tokenizer),
        generator=generator, cache=cache, compile=compile,
    )
    detok = StreamingDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    emitted = 0  # characters of detok.text already yielded
    n = 0
    tic = time.perf_counter()
    t_first = tic
    prompt_tps = 0.0

    def record(text: str, token: int | None, reason: str | None = None, stop: str | None = None) -> GenerationResponse:
        now = time.perf_counter()
        decode_tps = (n - 1) / (now - t_first) if n > 1 and now > t_first else 0.0
        return GenerationResponse(text, token, reason, t, cached, n, prompt_tps, decode_tps, stop)

    try:
        for step in steps:
            n += 1
            if n == 1:
                t_first = time.perf_counter()
                prompt_tps = (t - cached) / max(t_first - tic, 1e-9)
            tok = int(step.tokens[0])
            finished = bool(step.finished[0])
            if not (finished and tok in eos_ids):
                detok.add(tok)
            if finished:
                detok.finalize()
            text = detok.text
            if strings:
                at = _find_stop(text, emitted, strings)
                if at >= 0:
                    hit = next(s for s in strings if text.startswith(s, at))
                    yield record(text[emitted:at], tok, "stop", hit)
                    return
            if finished:
                yield record(text[emitted:], tok, step.finish_reasons[0])
                return
            end = len(text) - (_stop_holdback(text, emitted, strings) if strings else 0)
            delta, emitted = text[emitted:end], max(emitted, end)
            yield record(delta, tok)
        # max_new_tokens == 0: nothing was generated.
        yield record("", None, "length")
    finally:
        steps.close()


# ----------------------------------------------------------------------------------------------- streamers
class TextStreamer:
    """HF-compatible streamer for generate(streamer=...): prints text as it becomes safe to show.

    put() receives the prompt ids first (skipped with skip_prompt=True), then each new id; output
    never splits a UTF-8 character. Batch size 1 only. Override on_finalized_text to redirect.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, skip_special_tokens: bool = True,
                 **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.decode_kwargs = decode_kwargs
        self._reset()

    def _reset(self) -> None:
        self._detok = StreamingDetokenizer(self.tokenizer, self.skip_special_tokens, **self.decode_kwargs)
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        value = torch.as_tensor(value)
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError(f"{type(self).__name__} only supports batch size 1")
        ids = value.reshape(-1).tolist()
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        text = "".join(self._detok.add(i) for i in ids)
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        text = self._detok.finalize()
        self._reset()
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """A TextStreamer whose text deltas are read by iterating it, typically from another thread:

        streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
        Thread(target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer)).start()
        for delta in streamer: ...

    With ``timeout`` (seconds), waiting longer for the next delta raises queue.Empty.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 skip_special_tokens: bool = True, **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, skip_special_tokens, **decode_kwargs)
        self.text_queue: queue.Queue[str | None] = queue.Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> "TextIteratorStreamer":
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value
