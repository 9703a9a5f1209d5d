"""The serving engine: one model worker thread doing continuous batching.

Requests wait in a bounded queue. Each iteration the worker admits waiting requests while a batch
row is free and the token budget (``max_batched_tokens``) lasts, prefills them, then runs ONE
decode step for every active sequence together. A finished or cancelled sequence leaves at the end
of that step, so a new request never waits for the whole batch to drain; a cancelled request
(client gone) frees its row within one decode step.

Prefill is batched and chunked so that arrivals do not stall the running sequences:
- prompts admitted together are prefilled in one forward (left-padded groups, see
  ``_prefill_groups``): the weights are read once for all of them;
- while sequences are decoding, each iteration prefills only as many prompt tokens as take about
  one decode step (measured as the engine runs), so a long prompt or a burst of arrivals is
  spread over several iterations instead of freezing every stream for the whole prefill. With
  nothing decoding, prefill runs at full speed.
Chunked prefill computes the same attention as one full prefill (the dynamic-NTK alpha of each
row is fixed from its whole prompt before the first chunk).

Each request carries its own sampling settings and seed (its own ``torch.Generator``), stop ids
and stop strings. Text goes out through a per-request callback as deltas that never contain a
partial stop string or a split UTF-8 character. The callback runs on the worker thread; the HTTP
layer hands events to its event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..cache import KVCache, RowKVCache
from ..config import ntk_alpha
from ..generate import StreamingDetokenizer, _find_stop, _stop_holdback, tokenizer_vocab_limit
from ..sampling import SamplingParams, apply_penalties, sample, warp

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"the request queue is full ({depth} waiting); retry in {retry_after_s:.0f} s")
        self.depth, self.retry_after_s = depth, retry_after_s


class EngineStopped(Exception):
    pass


@dataclass
class RequestParams:
    """What one request asks of the engine (the HTTP layer maps OpenAI fields onto these)."""

    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    ignore_eos: bool = False  # benchmarks: run to max_new_tokens whatever the model says


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """One update of a request: new text (maybe empty), the tokens it came from, and, on the last
    event, the finish reason and token counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Request:
    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: RequestParams, on_event: Callable[[Event], None],
                 tokenizer: Any) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self.output_ids: list[int] = []
        self.detok = StreamingDetokenizer(tokenizer, skip_special_tokens=True)
        self.sent = 0  # characters of detok.text already sent
        self.stop = [s for s in params.stop if s]
        self.stop_ids = set() if params.ignore_eos else set(params.stop_token_ids)
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(int(params.seed))
        self.counts: torch.Tensor | None = None  # token counts for repetition / presence penalties
        self.output_counts: torch.Tensor | None = None
        self.cancelled = threading.Event()
        self.finished = False
        self.row: int | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        """Ask the engine to drop this request (takes effect within one decode step)."""
        self.cancelled.set()


@dataclass
class _Prefill:
    """A group of prompts being prefilled together, possibly over several iterations."""

    requests: list[Request]
    ids: torch.Tensor  # [B, L] left-padded prompt ids
    mask: torch.Tensor | None  # [B, L] True on real tokens; None when no row is padded
    cache: KVCache
    chunkable: bool  # False when the cache must see the whole prompt at once (official int8 mode)
    done: int = 0  # columns prefilled so far
    logits: torch.Tensor | None = None  # [B, vocab] at the last column, once prefilled

    @property
    def remaining_tokens(self) -> int:
        return (self.ids.shape[1] - self.done) * self.ids.shape[0]


class Engine:
    """Continuous batching over a QWenLMHeadModel. Start it, ``submit`` requests, ``stop`` it."""

    # Callers holding an engine (ChatSession) build requests as engine.Params(...), without importing this module.
    Params = RequestParams

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 16, max_batched_tokens: int = 4096,
                 max_queue: int = 256, max_model_len: int | None = None, batch_prefill: bool = True,
                 prefill_chunk: int | None = None) -> None:
        if max_batch_size < 1 or max_batched_tokens < 1 or max_queue < 1:
            raise ValueError("max_batch_size, max_batched_tokens and max_queue must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_batched_tokens, self.max_queue = max_batch_size, max_batched_tokens, max_queue
        self.batch_prefill = batch_prefill
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (or None for automatic), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk  # prompt tokens per iteration while decoding; None: about one step
        cfg = model.config
        self.max_model_len = int(max_model_len or getattr(cfg, "max_position_embeddings", None) or cfg.seq_length)
        self.vocab_limit = tokenizer_vocab_limit(tokenizer)
        self.device = model.transformer.wte.weight.device
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # index == cache row
        self._prefills: deque[_Prefill] = deque()  # admitted, not yet fully prefilled
        # Measured costs (moving averages) that size the prefill chunks while sequences decode.
        self._decode_step_s: float | None = None
        self._prefill_token_s: float | None = None
        self._cache = RowKVCache(model, max_batch_size, capacity=min(256, self.max_model_len))
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = EngineStats()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="qwen-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ submitting
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ValueError (with the numbers) when prompt + max_new_tokens exceeds the context."""
        if prompt_len + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request has "
                f"{prompt_len} prompt tokens and asks for {max_new_tokens} new tokens "
                f"({prompt_len + max_new_tokens} in total). Shorten the messages or lower max_tokens.")

    def submit(self, prompt_ids: Sequence[int], params: RequestParams, on_event: Callable[[Event], None]) -> Request:
        """Queue a request; events arrive through ``on_event`` (called on the worker thread)."""
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        req = Request(prompt_ids, params, on_event, self.tokenizer)
        with self._lock:
            if self._stopping or self._thread is None:
                raise EngineStopped("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(len(self._waiting), retry_after_s=max(1.0, self.stats.recent_request_seconds()))
            self._waiting.append(req)
            self.stats.requests += 1
            self._lock.notify_all()
        return req

    def stream(self, prompt_ids: Sequence[int], params: RequestParams) -> Iterator[Event]:
        """Blocking iterator over a request's events (for in-process callers: CLI, tests)."""
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                ev = events.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            if not req.finished:
                req.cancel()

    def generate(self, prompt_ids: Sequence[int], params: RequestParams) -> tuple[str, list[int], str]:
        """Run one request to the end: (text, generated ids, finish reason)."""
        text, ids, reason = [], [], FINISH_STOP
        for ev in self.stream(prompt_ids, params):
            if ev.error:
                raise RuntimeError(ev.error)
            text.append(ev.text)
            ids += ev.token_ids
            reason = ev.finish_reason or reason
        return "".join(text), ids, reason

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._active and not self._prefills:
                    self._lock.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible()
            try:
                for group in self._prefill_groups(admitted):
                    self._prefills.append(self._start_prefill(group))
                self._run_prefills()
                self._drop_cancelled()
                if self._active:
                    self._decode_step()
            except Exception as exc:  # a failing step must not kill the server: fail the requests in it
                pending = [r for p in self._prefills for r in p.requests]
                for req in admitted + pending + self._active:
                    if not req.finished:
                        self._finish(req, FINISH_STOP, error=f"{type(exc).__name__}: {exc}")
                self._active.clear()
                self._prefills.clear()
                self._cache.rows = 0
                self._cache.lengths.zero_()
        pending = [r for p in self._prefills for r in p.requests]
        for req in list(self._waiting) + pending + self._active:
            if not req.finished:
                self._finish(req, FINISH_CANCELLED, error="the server is shutting down")

    def _take_admissible(self) -> list[Request]:
        admitted: list[Request] = []
        # The decode step's tokens and the prompts still being prefilled count against the budget.
        budget = self.max_batched_tokens - len(self._active) - sum(p.remaining_tokens for p in self._prefills)
        rows = len(self._active) + sum(len(p.requests) for p in self._prefills)
        while self._waiting and rows + len(admitted) < self.max_batch_size:
            req = self._waiting[0]
            if req.cancelled.is_set():
                self._waiting.popleft()
                self._finish(req, FINISH_CANCELLED)
                continue
            # A prompt longer than the whole budget still runs when nothing else is admitted or pending.
            if len(req.prompt_ids) > budget and (admitted or self._prefills):
                break
            budget -= len(req.prompt_ids)
            admitted.append(self._waiting.popleft())
        return admitted

    def _prefill_groups(self, admitted: list[Request]) -> list[list[Request]]:
        """Split the admitted requests into batched prefills, longest prompts first.

        One forward over several prompts costs far less than one forward each (the weights are read
        once), which keeps the running requests' inter-token gaps short when many requests arrive at
        once. Prompts are left-padded to the group's longest, so a group takes a prompt only while
        the padding stays under a third of its tokens and the group under ``max_batched_tokens``.
        An official-mode int8 cache quantizes each prefill as one chunk, pads included, so there
        every prompt is prefilled alone (as the official code would).
        """
        quantizer = self._cache.quantizer
        if not self.batch_prefill or (quantizer is not None and quantizer.mode == "official"):
            return [[req] for req in admitted]
        groups: list[list[Request]] = []
        for req in sorted(admitted, key=lambda r: -len(r.prompt_ids)):
            group = groups[-1] if groups else None
            if group is not None:
                longest = len(group[0].prompt_ids)
                padded = longest * (len(group) + 1)
                real = sum(len(r.prompt_ids) for r in group) + len(req.prompt_ids)
                if padded <= self.max_batched_tokens and 3 * (padded - real) <= padded:
                    group.append(req)
                    continue
            groups.append([req])
        return groups

    def _start_prefill(self, group: list[Request]) -> _Prefill:
        lengths = [len(r.prompt_ids) for r in group]
        longest = max(lengths)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros(len(group), longest, dtype=torch.bool) if min(lengths) < longest else None
        for i, req in enumerate(group):  # left padding: every row's last token sits in the last column
            ids[i, longest - lengths[i]:] = torch.tensor(req.prompt_ids)
            if mask is not None:
                mask[i, longest - lengths[i]:] = True
        cache = KVCache.for_model(self.model, len(group), longest)
        cfg = self.model.config
        if cfg.use_dynamic_ntk:  # each row's alpha from its whole prompt, as a one-call prefill picks it
            cache.ntk_alpha = [float(ntk_alpha(n, cfg.seq_length)) for n in lengths]
        chunkable = cache.quantizer is None or cache.quantizer.mode != "official"
        return _Prefill(group, ids, mask, cache, chunkable)

    def _prefill_budget(self) -> int | None:
        """Prompt tokens this iteration may prefill (None: no limit).

        A prefill stalls every running stream for its duration, so while sequences decode an iteration
        prefills about one decode step's worth of tokens. Not so when the prompts waiting for their
        prefill outnumber the running streams (a burst of arrivals): then stalling the few running
        streams once costs less than holding the many new ones back for several iterations, during
        which the decode steps would also run at a fraction of the batch.
        """
        if not self._active or sum(len(p.requests) for p in self._prefills) > len(self._active):
            return None
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        if self._decode_step_s is None or self._prefill_token_s is None:
            return self.MIN_PREFILL_CHUNK * 4
        return max(self.MIN_PREFILL_CHUNK, int(self._decode_step_s / self._prefill_token_s))

    MIN_PREFILL_CHUNK = 16  # tokens; smaller chunks would pay a whole weight read for almost nothing

    def _run_prefills(self) -> None:
        budget = self._prefill_budget()
        while self._prefills and (budget is None or budget > 0):
            job = self._prefills[0]
            if all(r.cancelled.is_set() for r in job.requests):
                self._prefills.popleft()
                for req in job.requests:
                    self._finish(req, FINISH_CANCELLED)
                continue
            rows, total = job.ids.shape
            cols = total - job.done
            if budget is not None and job.chunkable:
                cols = max(1, min(cols, budget // rows))
            self._prefill_chunk(job, cols)
            if budget is not None:
                budget -= cols * rows
            if job.done == total:
                self._prefills.popleft()
                self._finish_prefill(job)

    def _prefill_chunk(self, job: _Prefill, cols: int) -> None:
        start, end = job.done, job.done + cols
        last = end == job.ids.shape[1]
        ids = job.ids[:, start:end].to(self.device)
        mask = job.mask[:, start:end].to(self.device) if job.mask is not None else None
        began = time.perf_counter()
        out = self.model(ids, attention_mask=mask, past_key_values=job.cache, use_cache=True, logits_to_keep=1)
        job.logits = out.logits[:, -1] if last else None
        self._sync()
        per_token = (time.perf_counter() - began) / ids.numel()
        self._prefill_token_s = per_token if self._prefill_token_s is None else \
            0.8 * self._prefill_token_s + 0.2 * per_token
        job.done = end
        self.stats.prefill_batches += 1

    def _sync(self) -> None:
        """Wait for queued GPU work, so the step timings that size prefill chunks are real."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _finish_prefill(self, job: _Prefill) -> None:
        lengths = job.mask.sum(-1).tolist() if job.mask is not None else [job.ids.shape[1]] * job.ids.shape[0]
        self.stats.prompt_tokens += int(sum(lengths))
        for i, req in enumerate(job.requests):
            if req.cancelled.is_set():
                self._finish(req, FINISH_CANCELLED)
                continue
            token = self._sample(req, job.logits[i:i + 1])
            if self._accept(req, token[0]):
                req.row = self._cache.insert(job.cache, i)
                self._active.append(req)

    def _decode_step(self) -> None:
        last = torch.tensor([[r.output_ids[-1]] for r in self._active], device=self.device)
        self._cache.reserve(self._cache.length + 1)
        began = time.perf_counter()
        logits = self.model(last, past_key_values=self._cache, use_cache=True).logits[:, -1]
        self._sync()
        took = time.perf_counter() - began
        self._decode_step_s = took if self._decode_step_s is None else 0.8 * self._decode_step_s + 0.2 * took
        tokens = self._sample_batch(logits)
        done = [req for req, tok in zip(list(self._active), tokens) if not self._accept(req, tok)]
        for req in done:
            self._release(req)
        self.stats.decode_steps += 1
        self.stats.batch_size_sum += len(tokens)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._active if r.cancelled.is_set()]:
            self._release(req)
            self._finish(req, FINISH_CANCELLED)

    def _release(self, req: Request) -> None:
        row = self._active.index(req)
        moved = self._cache.remove(row)
        last = self._active.pop()
        if moved is not None:
            self._active[row] = last
            last.row = row
        req.row = None

    # ------------------------------------------------------------------ sampling
    def _mask_undecodable(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.vocab_limit and self.vocab_limit < logits.shape[-1]:
            logits[..., self.vocab_limit:] = float("-inf")
        return logits

    def _sample_batch(self, logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        logits = self._mask_undecodable(logits)
        plain = [i for i, r in enumerate(self._active) if _is_plain_greedy(r)]
        out: list[Any] = [None] * len(self._active)
        if plain:  # one argmax for all plain greedy rows
            picks = logits[plain].argmax(dim=-1).tolist()
            for i, t in zip(plain, picks):
                out[i] = (t, _logprob(logits[i], t, self._active[i].params.logprobs))
        for i, req in enumerate(self._active):
            if out[i] is None:
                out[i] = self._sample(req, logits[i:i + 1], masked=True)[0]
        return out

    def _sample(self, req: Request, logits: torch.Tensor, masked: bool = False) -> list[tuple[int, TokenLogprob | None]]:
        logits = logits if masked else self._mask_undecodable(logits)
        p = req.params.sampling
        if p.needs_seen or p.needs_output_counts:
            if req.counts is None:
                v = logits.shape[-1]
                req.counts = torch.bincount(torch.tensor(req.prompt_ids), minlength=v)[None].to(logits.device)
                req.output_counts = torch.zeros_like(req.counts)
        processed = apply_penalties(logits, p, req.counts, req.output_counts)
        token = int(sample(warp(processed, p), not p.greedy, req.generator)[0])
        return [(token, _logprob(logits[0], token, req.params.logprobs))]

    # ------------------------------------------------------------------ per-token bookkeeping
    def _accept(self, req: Request, picked: tuple[int, TokenLogprob | None]) -> bool:
        """Record a sampled token; emit text; return False when the request is finished."""
        token, logprob = picked
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
            self.stats.observe_ttft(req.first_token_at - req.submitted)
        req.output_ids.append(token)
        self.stats.generation_tokens += 1
        if req.counts is not None:
            req.counts[0, token] += 1
            req.output_counts[0, token] += 1
        logprobs = [logprob] if logprob is not None else []
        if token in req.stop_ids:
            self._finish(req, FINISH_STOP, token_ids=[token], logprobs=logprobs)
            return False
        req.detok.add(token)
        text = req.detok.text
        if req.stop:
            hit = _find_stop(text, max(0, req.sent - max(map(len, req.stop)) + 1), req.stop)
            if hit >= 0:
                self._finish(req, FINISH_STOP, text=text[req.sent:hit], token_ids=[token], logprobs=logprobs)
                return False
        if len(req.output_ids) >= req.params.max_new_tokens or \
                len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len:
            self._finish(req, FINISH_LENGTH, token_ids=[token], logprobs=logprobs)
            return False
        safe = len(text) - (_stop_holdback(text, req.sent, req.stop) if req.stop else 0)
        delta = text[req.sent:safe]
        req.sent = max(req.sent, safe)
        self._emit(req, Event(text=delta, token_ids=[token], logprobs=logprobs))
        return True

    def _finish(self, req: Request, reason: str, text: str | None = None, token_ids: list[int] | None = None,
                logprobs: list[TokenLogprob] | None = None, error: str | None = None) -> None:
        if req.finished:
            return
        if text is None and reason in (FINISH_STOP, FINISH_LENGTH) and error is None:
            # Flush what was held back (an incomplete character, a prefix of a stop string that
            # never completed), still cut at a stop string should the flush complete one.
            req.detok.finalize()
            text = req.detok.text[req.sent:]
            hit = _find_stop(text, 0, req.stop) if req.stop else -1
            text = text[:hit] if hit >= 0 else text
        req.finished = True
        self.stats.observe_finish(req)
        self._emit(req, Event(text=text or "", token_ids=token_ids or [], logprobs=logprobs or [],
                              finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                              completion_tokens=len(req.output_ids), error=error))

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        try:
            req.on_event(event)
        except Exception:  # a broken consumer (e.g. a closed event loop) cancels only its own request
            req.cancel()


def _is_plain_greedy(req: Request) -> bool:
    p = req.params.sampling
    return p.greedy and not p.needs_seen and not p.needs_output_counts


def _logprob(logits_row: torch.Tensor, token: int, k: int | None) -> TokenLogprob | None:
    if k is None:
        return None
    logp = torch.log_softmax(logits_row.float(), dim=-1)
    top = torch.topk(logp, k) if k > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)


class EngineStats:
    """Counters for /metrics (monotonic totals plus latency sums; read without locking)."""

    def __init__(self) -> None:
        self.requests = self.rejected = self.finished = 0
        self.prompt_tokens = self.generation_tokens = 0
        self.decode_steps = self.batch_size_sum = 0
        self.prefill_batches = 0  # forward calls that prefilled one or more prompts
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.latency_sum = 0.0
        self.cancelled = 0
        self._recent: deque[float] = deque(maxlen=32)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1

    def observe_finish(self, req: Request) -> None:
        seconds = time.perf_counter() - req.submitted
        self.finished += 1
        self.latency_sum += seconds
        self._recent.append(seconds)
        if req.cancelled.is_set():
            self.cancelled += 1

    def recent_request_seconds(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else 1.0
