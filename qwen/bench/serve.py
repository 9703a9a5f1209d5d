"""``qwen bench serve``: the HTTP server under N concurrent streaming clients, ours vs one request at a time.

    qwen bench serve                                      # demo model, N = 1, 4, 16, both servers
    qwen bench serve --preset qwen-300m --max-tokens 64   # random weights in a ~300M shape
    qwen bench serve --url http://127.0.0.1:8000          # a server that is already running

Two servers are started one after the other, each in its own process on a free 127.0.0.1 port, running
the real ``qwen serve`` stack (uvicorn + the FastAPI app + the engine):
  ours            continuous batching, max_batch_size = the largest N
  one-at-a-time   the same code with max_batch_size = 1: one worker serving requests one after another,
                  which is the design of the official openai_api.py
Each concurrency level N starts with a warm-up wave of N short requests, then N closed-loop clients each
send streaming requests back to back (temperature 0, ``ignore_eos`` so every request generates exactly
``--max-tokens`` tokens, ``stream_options.include_usage`` so token counts come from the server) until the
level's request count is done. Per request: time to first token (request sent -> first chunk carrying
text) and inter-token latencies (gaps between chunks carrying text; a chunk may hold more than one token
when a token ends inside a UTF-8 character, so ``chunks/token`` is reported too). Per level: aggregate
tokens/s = completion tokens of all requests / wall time of the level, and p50/p99 over all requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import urlsplit

SERVER_FLAG = "--server"
PORT_LINE = "qwen-bench-serve-port"
OURS, ONE_AT_A_TIME = "ours", "one-at-a-time"
# The targets for ours: throughput at N=16 >= 5x N=1, p99 inter-token latency at N=16 <= 3x N=1.
TARGET_LOW_N, TARGET_HIGH_N = 1, 16
THROUGHPUT_TARGET, ITL_TARGET = 5.0, 3.0

_WORDS = ("river mountain lantern harvest copper violin meadow engine orbit puzzle garden signal winter "
          "falcon marble canyon rocket candle forest harbor pepper silver thunder bridge saddle comet "
          "island ladder mirror nectar oyster quartz").split()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the client
class ServerError(RuntimeError):
    pass


@dataclass
class RequestResult:
    """One streamed request, times in seconds on the client's perf_counter."""

    sent: float
    ttft: float
    itl: list[float]
    completion_tokens: int
    chunks: int  # chunks that carried text (or the finish): ITL has chunks - 1 entries
    latency: float


@dataclass
class Target:
    """Where to send requests: host, port and the path prefix in front of /v1/..."""

    host: str
    port: int
    prefix: str = ""
    tls: bool = False
    api_key: str | None = None

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None) -> "Target":
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        prefix = parts.path.rstrip("/").removesuffix("/v1")
        return cls(parts.hostname, parts.port or (443 if tls else 80), prefix, tls, api_key)

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{self.prefix}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """A plain blocking GET (outside the timed window: health, models, metrics)."""
        req = urllib.request.Request(self.base_url + path, headers=self.headers())
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


async def _body_blocks(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """The response body as it arrives, with HTTP/1.1 chunked framing removed."""
    if not chunked:
        while block := await reader.read(65536):
            yield block
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        block = await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
        yield block


async def stream_request(target: Target, path: str, body: dict[str, Any]) -> RequestResult:
    """POST a streaming request and time its server-sent events.

    A hand-written HTTP/1.1 client (asyncio streams): it timestamps bytes the moment they are read and
    costs the 2-core benchmark machine far less per chunk than a general-purpose client would.
    """
    ctx = ssl.create_default_context() if target.tls else None
    reader, writer = await asyncio.open_connection(target.host, target.port, ssl=ctx)
    try:
        payload = json.dumps(body).encode()
        head = [f"POST {target.prefix}{path} HTTP/1.1", f"Host: {target.host}:{target.port}",
                "Content-Type: application/json", "Accept: text/event-stream", f"Content-Length: {len(payload)}",
                "Connection: close", *(f"{k}: {v}" for k, v in target.headers().items())]
        sent = time.perf_counter()
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").split()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        chunked = "chunked" in headers.get("transfer-encoding", "")
        if len(status_line) < 2 or status_line[1] != "200":
            text = b"".join([b async for b in _body_blocks(reader, chunked)]).decode(errors="replace")
            raise ServerError(f"{' '.join(status_line[1:]) or 'no status'}: {text[:500]}")

        arrivals: list[float] = []
        usage_tokens: int | None = None
        pending = b""
        async for block in _body_blocks(reader, chunked):
            now = time.perf_counter()
            pending += block
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.rstrip(b"\r")
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                event = json.loads(data)
                if "error" in event:
                    raise ServerError(f"error event: {event['error']}")
                if event.get("usage"):
                    usage_tokens = int(event["usage"]["completion_tokens"])
                for choice in event.get("choices") or ():
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    # The finish chunk carries the last token even when that token adds no text.
                    if text or choice.get("finish_reason"):
                        arrivals.append(now)
        done = time.perf_counter()
    finally:
        writer.close()
    if not arrivals:
        raise ServerError("the stream ended without any token")
    return RequestResult(sent=sent, ttft=arrivals[0] - sent, itl=[b - a for a, b in zip(arrivals, arrivals[1:])],
                         completion_tokens=usage_tokens if usage_tokens is not None else len(arrivals),
                         chunks=len(arrivals), latency=done - sent)


# ---------------------------------------------------------------------------------------------- load
@dataclass
class LoadSettings:
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    max_tokens: int = 128
    rounds: int = 2  # requests per client at each level ...
    min_requests: int = 4  # ... but at least this many per level
    warmup_tokens: int = 8
    endpoint: str = "chat"
    prompt_words: int = 24
    timeout_s: float = 600.0

    def requests_at(self, n: int) -> int:
        return max(self.min_requests, self.rounds * n)


def prompt_text(index: int, words: int) -> str:
    """Distinct prompts of equal length (no prefix caching to exploit, no length skew between levels)."""
    picked = [_WORDS[(index * 7 + k * (1 + index % 5)) % len(_WORDS)] for k in range(words)]
    return f"Request {index}: write a story about " + " ".join(picked) + "."


def request_body(settings: LoadSettings, index: int, max_tokens: int, model: str | None) -> tuple[str, dict]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    text = prompt_text(index, settings.prompt_words)
    if settings.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
        return "/v1/chat/completions", body
    body["prompt"] = text
    return "/v1/completions", body


async def run_level(target: Target, settings: LoadSettings, n: int, model: str | None,
                    first_index: int) -> tuple[list[RequestResult], float]:
    """N closed-loop clients sharing one request counter: (results, wall seconds of the level)."""
    total = settings.requests_at(n)
    counter = iter(range(total))
    results: list[RequestResult] = []

    async def client() -> None:
        for i in counter:
            path, body = request_body(settings, first_index + i, settings.max_tokens, model)
            results.append(await stream_request(target, path, body))

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(n))), settings.timeout_s)
    return results, time.perf_counter() - start


async def warm_up(target: Target, settings: LoadSettings, n: int, model: str | None) -> None:
    if settings.warmup_tokens < 1:
        return
    bodies = [request_body(settings, 10**6 + i, settings.warmup_tokens, model) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(stream_request(target, p, b) for p, b in bodies)), settings.timeout_s)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def engine_counters(target: Target) -> dict[str, float] | None:
    """Decode steps and batch rows from our server's /metrics (None for servers without them)."""
    try:
        status, text = target.get("/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    out = {}
    for line in text.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("qwen_decode_steps_total", "qwen_decode_batch_rows_total"):
            out[name] = float(value)
    return out if len(out) == 2 else None


def summarize(n: int, results: list[RequestResult], wall: float, before: dict | None, after: dict | None) -> dict:
    tokens = sum(r.completion_tokens for r in results)
    itl = [g for r in results for g in r.itl]
    ttft = [r.ttft for r in results]
    out: dict[str, Any] = {
        "concurrency": n, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "latency_p50_s": percentile([r.latency for r in results], 50),
        "chunks_per_token": sum(r.chunks for r in results) / tokens,
        "decode_steps": None, "mean_decode_batch": None,
    }
    if before and after:
        steps = after["qwen_decode_steps_total"] - before["qwen_decode_steps_total"]
        rows = after["qwen_decode_batch_rows_total"] - before["qwen_decode_batch_rows_total"]
        out["decode_steps"] = int(steps)
        out["mean_decode_batch"] = rows / steps if steps else None
    return out


def served_model_id(target: Target) -> str | None:
    try:
        status, raw = target.get("/v1/models")
        return json.loads(raw)["data"][0]["id"] if status == 200 else None
    except (OSError, ValueError, KeyError, IndexError):
        return None


def measure_server(label: str, target: Target, settings: LoadSettings, max_batch_size: int | None) -> dict:
    """Every concurrency level against one running server."""
    model = served_model_id(target)
    levels = []
    next_index = 0
    for n in settings.concurrency:
        asyncio.run(warm_up(target, settings, n, model))
        before = engine_counters(target)
        _log(f"  {label}: N={n}, {settings.requests_at(n)} requests x {settings.max_tokens} tokens ...")
        results, wall = asyncio.run(run_level(target, settings, n, model, next_index))
        next_index += len(results)
        summary = summarize(n, results, wall, before, engine_counters(target))
        expected = settings.requests_at(n) * settings.max_tokens
        if summary["completion_tokens"] != expected:
            _log(f"  warning: {summary['completion_tokens']} tokens generated, {expected} asked for "
                 "(does the server honour ignore_eos?)")
        _log(f"  {label}: N={n}: {summary['throughput_tok_s']:.1f} tok/s, "
             f"ITL p50 {summary['itl_p50_s'] * 1e3:.1f} ms, p99 {summary['itl_p99_s'] * 1e3:.1f} ms")
        levels.append({"summary": summary, "requests": [asdict(r) for r in results]})
    return {"label": label, "url": target.base_url, "max_batch_size": max_batch_size, "levels": levels}


# ---------------------------------------------------------------------------------------------- servers
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen-demo",
                   help="checkpoint directory for the servers (default: the embedded demo model 'qwen-demo')")
    p.add_argument("--preset", default=None,
                   help="serve random weights in this shape instead of --model (e.g. qwen-300m, qwen-7b; "
                        "see qwen.config.PRESETS), with the bundled Qwen tokenizer")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each server (default: torch's own choice, one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of --preset (default 0)")


def build_served_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, generation config) as the server will hold them."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.preset is None:
        from ..commands.common import load

        model, tokenizer = load(argparse.Namespace(model=args.model, device=device, cpu_only=False, dtype=args.dtype))
        return model, tokenizer, getattr(model, "generation_config", None)

    from ..config import preset_config
    from ..cpu_pack import pack_linear_layers, packing_supported
    from ..model import QWenLMHeadModel
    from ..tokenizer import QWenTokenizer

    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    with torch.device("meta"):
        model = QWenLMHeadModel(preset_config(args.preset))
    # Materialise directly in the target dtype and device: a 7B shape never exists in fp32.
    model.to(dtype).to_empty(device=device)
    model.init_weights(seed=args.seed)
    if device == "cpu" and packing_supported(dtype):
        pack_linear_layers(model)  # what from_pretrained does for an fp32 CPU model
    return model.eval(), QWenTokenizer.from_pretrained("qwen-demo"), None


def make_app(model: Any, tokenizer: Any, generation_config: Any, max_batch_size: int, max_queue: int) -> Any:
    from ..serve.app import create_app
    from ..serve.engine import Engine

    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue).start()
    app = create_app(engine, tokenizer, model_id="bench", generation_config=generation_config)
    return app


def _bind_free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _uvicorn_server(app: Any) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))


def server_main(args: argparse.Namespace) -> int:
    """The server process: binds a free port, prints it on stdout, serves until SIGTERM."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, gen = build_served_model(args)
    app = make_app(model, tokenizer, gen, args.max_batch_size, args.max_queue)
    sock = _bind_free_socket()
    print(f"{PORT_LINE} {sock.getsockname()[1]}", flush=True)
    os.dup2(2, 1)  # nothing else may reach the parent's pipe, which nobody reads any more
    try:
        _uvicorn_server(app).run(sockets=[sock])
    finally:
        app.state.engine.stop()
    return 0


def _wait_ready(target: Target, alive: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited during start-up (its log is above)")
        try:
            if target.get("/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {target.base_url} was not ready within {timeout_s:.0f} s")


class ServerProcess:
    """``with ServerProcess(args, batch) as target:`` a server in a child process, stopped on exit."""

    def __init__(self, args: argparse.Namespace, max_batch_size: int, max_queue: int) -> None:
        cmd = [sys.executable, "-m", "qwen.bench.serve", SERVER_FLAG, "--model", args.model,
               "--seed", str(args.seed), "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue)]
        for flag, value in (("--preset", args.preset), ("--device", args.device), ("--dtype", args.dtype),
                            ("--threads", args.threads)):
            if value is not None:
                cmd += [flag, str(value)]
        self.cmd = cmd
        self.start_timeout_s = args.start_timeout

    def __enter__(self) -> Target:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        port = None
        for line in self.proc.stdout:  # the port comes once the model is built; EOF if the server died
            if line.startswith(PORT_LINE):
                port = int(line.split()[1])
                break
        if port is None:
            self.__exit__()
            raise RuntimeError("the server process failed to start (its log is above)")
        target = Target("127.0.0.1", port)
        _wait_ready(target, lambda: self.proc.poll() is None, self.start_timeout_s)
        return target

    def __exit__(self, *exc: Any) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class InProcessServer:
    """A server on a thread of this process (one model shared by both servers; clients share the GIL)."""

    def __init__(self, model: Any, tokenizer: Any, generation_config: Any, max_batch_size: int,
                 max_queue: int) -> None:
        self.parts = (model, tokenizer, generation_config, max_batch_size, max_queue)

    def __enter__(self) -> Target:
        self.app = make_app(*self.parts)
        self.sock = _bind_free_socket()
        self.server = _uvicorn_server(self.app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        target = Target("127.0.0.1", self.sock.getsockname()[1])
        _wait_ready(target, self.thread.is_alive, 60)
        return target

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.app.state.engine.stop()
        self.sock.close()


def started_servers(args: argparse.Namespace, labels: list[str], batch: int) -> Iterator[tuple[str, int, Any]]:
    """(label, max_batch_size, context manager yielding a Target) per server to start."""
    max_queue = max(256, 4 * batch)
    shared: tuple[Any, Any, Any] | None = None
    for label in labels:
        size = batch if label == OURS else 1
        if args.in_process:
            if shared is None:
                import torch

                if args.threads:
                    torch.set_num_threads(args.threads)
                shared = build_served_model(args)
            yield label, size, InProcessServer(*shared, max_batch_size=size, max_queue=max_queue)
        else:
            yield label, size, ServerProcess(args, size, max_queue)


# ---------------------------------------------------------------------------------------------- report
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def _level(server: dict, n: int) -> dict | None:
    return next((lv["summary"] for lv in server["levels"] if lv["summary"]["concurrency"] == n), None)


def render_markdown(servers: list[dict], settings: LoadSettings) -> str:
    lines = [
        f"{settings.endpoint} endpoint, streaming, temperature 0, ignore_eos, {settings.max_tokens} tokens per "
        f"request; each of N clients sends requests back to back (at least {settings.min_requests} requests, "
        f"{settings.rounds} per client). Latencies in ms.",
        "",
        "| server | N | requests | tokens | wall s | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
        "mean decode batch | chunks/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server in servers:
        for level in server["levels"]:
            s = level["summary"]
            batch = f"{s['mean_decode_batch']:.1f}" if s["mean_decode_batch"] is not None else "-"
            lines.append(
                f"| {server['label']} | {s['concurrency']} | {s['requests']} | {s['completion_tokens']} | "
                f"{s['wall_s']:.1f} | {s['throughput_tok_s']:,.1f} | {_ms(s['ttft_p50_s'])} | {_ms(s['ttft_p99_s'])} | "
                f"{_ms(s['itl_p50_s'])} | {_ms(s['itl_p99_s'])} | {batch} | {s['chunks_per_token']:.2f} |")
    lo, hi = min(settings.concurrency), max(settings.concurrency)
    if lo != hi:
        lines += ["", f"Scaling from N={lo} to N={hi}:", ""]
        for server in servers:
            a, b = _level(server, lo), _level(server, hi)
            assert a is not None and b is not None
            tput, itl = b["throughput_tok_s"] / a["throughput_tok_s"], b["itl_p99_s"] / a["itl_p99_s"]
            lines.append(f"- {server['label']}: throughput {tput:.2f}x, p99 ITL {itl:.2f}x")
    ours = next((s for s in servers if s["label"] == OURS), None)
    base = next((s for s in servers if s["label"] == ONE_AT_A_TIME), None)
    low, high = (_level(ours, TARGET_LOW_N), _level(ours, TARGET_HIGH_N)) if ours else (None, None)
    if low and high:
        tput, itl = high["throughput_tok_s"] / low["throughput_tok_s"], high["itl_p99_s"] / low["itl_p99_s"]
        verdict = {True: "met", False: "NOT met"}
        lines += ["", f"Targets ({OURS}, N={TARGET_HIGH_N} vs N={TARGET_LOW_N}): throughput {tput:.2f}x "
                      f"(>= {THROUGHPUT_TARGET:g}x: {verdict[tput >= THROUGHPUT_TARGET]}), p99 ITL {itl:.2f}x "
                      f"(<= {ITL_TARGET:g}x: {verdict[itl <= ITL_TARGET]})."]
    if ours and base:
        lines += ["", f"{OURS} / {ONE_AT_A_TIME}:", ""]
        for n in settings.concurrency:
            a, b = _level(ours, n), _level(base, n)
            if a and b:
                lines.append(f"- N={n}: throughput {a['throughput_tok_s'] / b['throughput_tok_s']:.2f}x, "
                             f"TTFT p50 {a['ttft_p50_s'] / b['ttft_p50_s']:.2f}x, "
                             f"p99 ITL {a['itl_p99_s'] / b['itl_p99_s']:.2f}x")
    return "\n".join(lines)


def write_plot(servers: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for server in servers:
        levels = [lv["summary"] for lv in server["levels"]]
        ns = [s["concurrency"] for s in levels]
        (line,) = ax_t.plot(ns, [s["throughput_tok_s"] for s in levels], marker="o", label=server["label"])
        color = line.get_color()
        ax_l.plot(ns, [s["itl_p99_s"] * 1e3 for s in levels], marker="o", color=color, label=f"{server['label']} p99")
        ax_l.plot(ns, [s["itl_p50_s"] * 1e3 for s in levels], marker=".", linestyle="--", color=color,
                  label=f"{server['label']} p50")
    for ax, ylabel in ((ax_t, "aggregate tokens/s"), (ax_l, "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ns = sorted({lv["summary"]["concurrency"] for s in servers for lv in s["levels"]})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("concurrent streaming clients (N)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"python {platform.python_version()}")


# ---------------------------------------------------------------------------------------------- CLI
def _positive_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--concurrency", "-n", type=_positive_list, default=[1, 4, 16],
                   help="comma-separated numbers of concurrent clients (default 1,4,16)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--rounds", type=int, default=2,
                   help="requests each client sends back to back at a level (default 2) ...")
    p.add_argument("--min-requests", type=int, default=4,
                   help="... with at least this many requests per level (default 4: N=1 sends 4)")
    p.add_argument("--warmup-tokens", type=int, default=8,
                   help="before each level, N concurrent requests of this many tokens, not timed (0: none)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions (default) or /v1/completions")
    p.add_argument("--prompt-words", type=int, default=24, help="words in each (distinct) prompt (default 24)")
    p.add_argument("--servers", default=f"{OURS},{ONE_AT_A_TIME}",
                   help=f"servers to start, comma-separated: {OURS} (max_batch_size = the largest N, or "
                        f"--max-batch-size) and {ONE_AT_A_TIME} (max_batch_size 1); default both")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help=f"the batch size of {OURS} (default: the largest N)")
    p.add_argument("--url", default=None,
                   help="benchmark this running server (http://HOST:PORT, a trailing /v1 is fine) instead of "
                        "starting any")
    p.add_argument("--api-key", default=os.environ.get("QWEN_API_KEY"),
                   help="bearer token for --url (default: $QWEN_API_KEY)")
    p.add_argument("--in-process", action="store_true",
                   help="run the servers on a thread of this process (one model load; clients then share the "
                        "GIL with the server, so numbers are lower than with the default child processes)")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for a server to start")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per concurrency level")
    p.add_argument("--json", metavar="FILE", help="also write raw results (every request's timings) as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw throughput and ITL vs N for every server")
    p.add_argument(SERVER_FLAG, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-queue", type=int, default=256, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.server:
        return server_main(args)
    for name in ("max_tokens", "rounds", "min_requests", "prompt_words"):
        if getattr(args, name) < 1:
            raise SystemExit(f"qwen bench serve: --{name.replace('_', '-')} must be >= 1")
    settings = LoadSettings(concurrency=args.concurrency, max_tokens=args.max_tokens, rounds=args.rounds,
                            min_requests=args.min_requests, warmup_tokens=args.warmup_tokens,
                            endpoint=args.endpoint, prompt_words=args.prompt_words, timeout_s=args.timeout)
    model_desc = f"preset {args.preset} (random weights)" if args.preset else args.model
    servers: list[dict] = []
    if args.url:
        target = Target.from_url(args.url, args.api_key)
        _wait_ready(target, lambda: True, 10)
        _log(f"benchmarking {target.base_url} ...")
        servers.append(measure_server("server", target, settings, None))
        model_desc = served_model_id(target) or args.url
    else:
        labels = [s.strip() for s in args.servers.split(",") if s.strip()]
        unknown = set(labels) - {OURS, ONE_AT_A_TIME}
        if unknown or not labels:
            raise SystemExit(f"qwen bench serve: --servers takes {OURS} and/or {ONE_AT_A_TIME}, got {args.servers!r}")
        batch = args.max_batch_size or max(settings.concurrency)
        for label, size, server in started_servers(args, labels, batch):
            _log(f"starting {label} (max_batch_size {size}) with {model_desc} ...")
            with server as target:
                servers.append(measure_server(label, target, settings, size))
    table = render_markdown(servers, settings)
    print(f"\nmachine: {machine_description()}; model: {model_desc}\n")
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"argv": argv, "machine": machine_description(), "model": model_desc,
                       "settings": asdict(settings), "servers": servers}, f, indent=1)
    if args.plot:
        write_plot(servers, args.plot, f"qwen bench serve: {model_desc}, {settings.max_tokens} tokens per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
