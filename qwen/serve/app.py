"""The OpenAI-compatible HTTP API over the batching engine (FastAPI; run by ``qwen serve``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Every error is OpenAI's error JSON with its
status code, and the server keeps serving after each one. Streaming uses server-sent events; a
client that goes away cancels its requests in the engine (its batch row frees within one step).
"""


import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Sequence

from ..generation_config import GenerationConfig
from ..sampling import SamplingParams
from .engine import Engine, EngineStopped, Event, QueueFull, RequestParams
from .protocol import APIError, Sampling, bad, build_chat_prompt, completion_prompts, dumps, logprob_entry, parse_sampling
from .react import FunctionCall, ReactStreamParser, parse_response


class ServerMetrics:
    def __init__(self) -> None:
        self.http: dict[tuple[str, int], int] = {}
        self.started = time.time()


def create_app(engine: Engine, tokenizer: Any, *, model_id: str, aliases: Sequence[str] = (),
               api_key: str | None = None, generation_config: GenerationConfig | None = None) -> Any:
    """The FastAPI application (the engine must be started by the caller or the lifespan)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    gen = generation_config or GenerationConfig()
    names = {model_id, *aliases}
    chat_stop_ids = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    metrics = ServerMetrics()
    app = FastAPI(title="qwen", version="1", docs_url="/docs")

    # ------------------------------------------------------------------ errors and auth
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(bad(str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(err.body(), status_code=500)

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        key = (request.url.path, response.status_code)
        metrics.http[key] = metrics.http.get(key, 0) + 1
        return response

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or token.strip() != api_key:
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def json_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json")
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        return body

    # ------------------------------------------------------------------ engine plumbing
    def engine_params(s: Sampling, prompt_len: int, stop_ids: list[int], extra_stop: Sequence[str] = (),
                      index: int = 0) -> RequestParams:
        temperature = s.temperature if s.temperature is not None else float(gen.temperature or 1.0)
        do_sample = bool(gen.do_sample) if s.temperature is None else True
        if temperature < 0.01:  # the official server's rule: (near) zero temperature is greedy
            do_sample, temperature = False, 1.0
        sampling = SamplingParams(
            do_sample=do_sample, temperature=temperature,
            top_p=s.top_p if s.top_p is not None else float(gen.top_p if gen.top_p is not None else 1.0),
            top_k=s.top_k if s.top_k is not None else int(gen.top_k or 0),
            repetition_penalty=s.repetition_penalty if s.repetition_penalty is not None
            else float(gen.repetition_penalty or 1.0),
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty)
        room = engine.max_model_len - prompt_len
        if s.max_tokens is not None:
            max_new = s.max_tokens
        else:
            max_new = min(int(gen.max_new_tokens or 512), room)
            if max_new < 1:
                max_new = 1  # let check_fits report the numbers
        try:
            engine.check_fits(prompt_len, max_new)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded")
        seed = None if s.seed is None else (s.seed + index) % 2**63
        return RequestParams(max_new_tokens=max_new, sampling=sampling, seed=seed, stop_token_ids=stop_ids,
                             stop=list(s.stop) + list(extra_stop), logprobs=s.logprobs, ignore_eos=s.ignore_eos)

    def submit(prompts: list[list[int]], params: list[RequestParams]) -> tuple[list, asyncio.Queue]:
        """Queue every request now (errors become 429/503/400 before any response starts)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        reqs: list = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params)):
                reqs.append(engine.submit(ids, p, lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))))
        except QueueFull as e:
            _cancel(reqs)
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(int(e.retry_after_s + 0.999))})
        except EngineStopped as e:
            _cancel(reqs)
            raise APIError(503, str(e))
        except ValueError as e:
            _cancel(reqs)
            raise bad(str(e))
        return reqs, events

    async def drain(reqs: list, events: asyncio.Queue) -> AsyncIterator[tuple[int, Event]]:
        """Yield (index, event) until every request finished; cancel whatever is left on exit."""
        open_ = len(reqs)
        try:
            while open_:
                i, ev = await events.get()
                if ev.finish_reason is not None:
                    open_ -= 1
                yield i, ev
        finally:
            _cancel(reqs)

    async def collect(request: Request, prompts: list[list[int]], params: list[RequestParams]) -> list[dict]:
        """Run to completion (non-streaming); a disconnected client cancels the work."""
        out = [{"text": [], "ids": [], "logprobs": [], "finish": None, "prompt": len(p), "completion": 0}
               for p in prompts]
        agen = drain(*submit(prompts, params))
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            async for i, ev in agen:
                if ev.error:
                    raise APIError(500, ev.error)
                o = out[i]
                o["text"].append(ev.text)
                o["ids"] += ev.token_ids
                o["logprobs"] += ev.logprobs
                if ev.finish_reason is not None:
                    o["finish"], o["completion"] = ev.finish_reason, ev.completion_tokens
                if watcher.done():
                    break
        finally:
            watcher.cancel()
            await agen.aclose()
        for o in out:
            o["text"] = "".join(o["text"])
        return out

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        card = {"id": model_id, "object": "model", "created": int(metrics.started), "owned_by": "qwen",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str, request: Request) -> dict:
        authorize(request)
        if name not in names:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": int(metrics.started), "owned_by": "qwen"}

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(render_metrics(engine, metrics), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        body = await json_body(request)
        s = parse_sampling(body, chat=True)
        prompt = build_chat_prompt(tokenizer, body)
        params = [engine_params(s, len(prompt.ids), chat_stop_ids, prompt.stop, i) for i in range(s.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_id}
        if s.stream:
            gen_ = stream_chat(head, prompt, s, drain(*submit([prompt.ids] * s.n, params)))
            return StreamingResponse(gen_, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await collect(request, [prompt.ids] * s.n, params)
        choices = []
        for i, r in enumerate(results):
            message: dict[str, Any] = {"role": "assistant", "content": r["text"]}
            finish = r["finish"]
            if prompt.functions:
                content, call = parse_response(r["text"])
                message["content"] = content
                if call is not None:
                    finish = _attach_call(message, call, prompt.api_style)
            choice = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
            if s.logprobs is not None:
                choice["logprobs"] = {"content": [logprob_entry(tokenizer, lp.token_id, lp.logprob, lp.top)
                                                  for lp in r["logprobs"]]}
            choices.append(choice)
        completion = sum(r["completion"] for r in results)
        return {**head, "object": "chat.completion", "choices": choices, "system_fingerprint": None,
                "usage": {"prompt_tokens": len(prompt.ids), "completion_tokens": completion,
                          "total_tokens": len(prompt.ids) + completion}}

    async def stream_chat(head: dict, prompt: Any, s: Sampling, agen: AsyncIterator) -> AsyncIterator[str]:
        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            obj = {**head, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": choices}
            if usage is not None or s.include_usage:
                obj["usage"] = usage
            return f"data: {dumps(obj)}\n\n"

        for i in range(s.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        parsers = [ReactStreamParser() if prompt.functions else None for _ in range(s.n)]
        completion = 0

        try:
            async for i, ev in agen:
                if ev.error:
                    yield f"data: {dumps(APIError(500, ev.error).body())}\n\n"
                    return
                text = ev.text
                parser = parsers[i]
                if parser is not None:
                    text = parser.feed(text)
                delta: dict[str, Any] = {}
                if text:
                    delta["content"] = text
                logprobs = None
                if s.logprobs is not None and ev.logprobs:
                    logprobs = {"content": [logprob_entry(tokenizer, lp.token_id, lp.logprob, lp.top)
                                            for lp in ev.logprobs]}
                finish = ev.finish_reason
                if finish is not None:
                    completion += ev.completion_tokens
                    if parser is not None:
                        rest, call = parser.finish()
                        if rest:
                            delta["content"] = delta.get("content", "") + rest
                        if call is not None:
                            finish = _attach_call(delta, call, prompt.api_style, streaming=True)
                if delta or logprobs or finish:
                    yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        finally:
            await agen.aclose()
        if s.include_usage:
            yield chunk([], {"prompt_tokens": len(prompt.ids), "completion_tokens": completion,
                             "total_tokens": len(prompt.ids) + completion})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        body = await json_body(request)
        s = parse_sampling(body, chat=False)
        prompts = completion_prompts(tokenizer, body)
        if body.get("echo"):
            raise bad("'echo' is not supported", "echo")
        jobs = [(p, engine_params(s, len(p), [tokenizer.eod_id], (), k)) for p in prompts for k in range(s.n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_id}
        n_prompt = sum(len(p) for p in prompts)
        if s.stream:
            agen = drain(*submit([j[0] for j in jobs], [j[1] for j in jobs]))
            return StreamingResponse(stream_completion(head, agen, s, n_prompt), media_type="text/event-stream")
        results = await collect(request, [j[0] for j in jobs], [j[1] for j in jobs])
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish"],
                    "logprobs": _legacy_logprobs(tokenizer, r["logprobs"]) if s.logprobs is not None else None}
                   for i, r in enumerate(results)]
        completion = sum(r["completion"] for r in results)
        return {**head, "object": "text_completion", "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion,
                          "total_tokens": n_prompt + completion}}

    async def stream_completion(head: dict, agen: AsyncIterator, s: Sampling, n_prompt: int) -> AsyncIterator[str]:
        completion = 0
        try:
            async for i, ev in agen:
                if ev.error:
                    yield f"data: {dumps(APIError(500, ev.error).body())}\n\n"
                    return
                if ev.finish_reason is not None:
                    completion += ev.completion_tokens
                if ev.text or ev.finish_reason:
                    lp = _legacy_logprobs(tokenizer, ev.logprobs) if s.logprobs is not None else None
                    obj = {**head, "object": "text_completion",
                           "choices": [{"index": i, "text": ev.text, "finish_reason": ev.finish_reason, "logprobs": lp}]}
                    yield f"data: {dumps(obj)}\n\n"
        finally:
            await agen.aclose()
        if s.include_usage:
            obj = {**head, "object": "text_completion", "choices": [],
                   "usage": {"prompt_tokens": n_prompt, "completion_tokens": completion,
                             "total_tokens": n_prompt + completion}}
            yield f"data: {dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"

    app.state.engine = engine
    app.state.metrics = metrics
    return app


def _cancel(reqs: list) -> None:
    for r in reqs:
        if not r.finished:
            r.cancel()


def _attach_call(target: dict, call: FunctionCall, style: str, streaming: bool = False) -> str:
    """Put a parsed call on a message (or stream delta) in the request's API style; the finish reason."""
    if style == "tools":
        tc = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": call.name, "arguments": call.arguments}}
        if streaming:
            tc["index"] = 0
        target["tool_calls"] = [tc]
        return "tool_calls"
    target["function_call"] = {"name": call.name, "arguments": call.arguments}
    return "function_call"


def _legacy_logprobs(tokenizer: Any, items: list) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in items:
        entry = logprob_entry(tokenizer, lp.token_id, lp.logprob, lp.top)
        out["tokens"].append(entry["token"])
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in entry["top_logprobs"]})
    return out


async def _wait_disconnect(request: Any) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def render_metrics(engine: Engine, metrics: ServerMetrics) -> str:
    st = engine.stats
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("qwen_requests_total", "counter", "Requests accepted by the engine.", [("", st.requests)])
    metric("qwen_requests_rejected_total", "counter", "Requests refused because the queue was full.", [("", st.rejected)])
    metric("qwen_requests_cancelled_total", "counter", "Requests cancelled (client gone).", [("", st.cancelled)])
    metric("qwen_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", st.prompt_tokens)])
    metric("qwen_generation_tokens_total", "counter", "Tokens generated.", [("", st.generation_tokens)])
    metric("qwen_queue_depth", "gauge", "Requests waiting for a batch row.", [("", engine.queue_depth)])
    metric("qwen_running_requests", "gauge", "Requests in the running batch.", [("", engine.running)])
    metric("qwen_decode_steps_total", "counter", "Batched decode steps.", [("", st.decode_steps)])
    metric("qwen_prefill_batches_total", "counter", "Forward calls that prefilled prompts (several per call when "
           "they arrive together).", [("", st.prefill_batches)])
    metric("qwen_decode_batch_rows_total", "counter", "Sum of batch sizes over decode steps.", [("", st.batch_size_sum)])
    metric("qwen_request_latency_seconds", "summary", "Time from submission to the last token.",
           [("_sum", round(st.latency_sum, 6)), ("_count", st.finished)])
    metric("qwen_time_to_first_token_seconds", "summary", "Time from submission to the first token.",
           [("_sum", round(st.ttft_sum, 6)), ("_count", st.ttft_count)])
    metric("qwen_http_responses_total", "counter", "HTTP responses by path and status.",
           [(f'{{path="{p}",status="{c}"}}', n) for (p, c), n in sorted(metrics.http.items())])
    return "\n".join(lines) + "\n"
