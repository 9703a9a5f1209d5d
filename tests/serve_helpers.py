"""A real uvicorn server on loopback in a background thread, a scripted model for the engine, and
requests submitted to an engine together."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

import torch

from qwen.cache import RowKVCache
from qwen.config import preset_config
from qwen.model import QWenLMHeadModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on 127.0.0.1 until the block ends."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class ScriptedQwen(QWenLMHeadModel):
    """A tiny real model (so the engine's caches work) whose logits follow a script.

    ``script_for(prompt_ids)`` picks the token list at each prefill; decode steps walk through it.
    One request at a time (the step counter is shared), which is all the function-calling tests need.
    """

    def __init__(self, script_for: Callable[[list[int]], list[int]]) -> None:
        super().__init__(preset_config("tiny", max_position_embeddings=2048))
        self.init_weights(seed=0)
        self.eval()
        self.script_for = script_for
        self.prompts: list[list[int]] = []
        self.step = 0
        self.script: list[int] = []

    def forward(self, input_ids: torch.Tensor | None = None, past_key_values: Any = None, **kw: Any) -> Any:
        out = super().forward(input_ids, past_key_values=past_key_values, **kw)
        if isinstance(past_key_values, RowKVCache):
            self.step += 1
        else:
            self.step = 0
            self.prompts.append(input_ids[0].tolist())
            self.script = self.script_for(self.prompts[-1])
        token = self.script[min(self.step, len(self.script) - 1)]
        logits = torch.full_like(out.logits, -10.0)
        logits[..., token] = 10.0
        out.logits = logits
        return out


def submit_together(engine: Any, prompts: list[list[int]], params: Any, timeout: float = 120) -> list[list[int]]:
    """Each prompt's generated tokens, the prompts submitted while holding the engine's lock, so that
    they all wait in the queue and the worker admits them in one iteration (the lock is re-entrant,
    submit takes it too)."""
    done = threading.Semaphore(0)
    outputs: list[list[int]] = [[] for _ in prompts]

    def collect(i: int) -> Callable[[Any], None]:
        def on_event(ev: Any) -> None:
            outputs[i].extend(ev.token_ids)
            if ev.finish_reason is not None:
                done.release()
        return on_event

    with engine._lock:
        for i, p in enumerate(prompts):
            engine.submit(p, params, collect(i))
    for _ in prompts:
        assert done.acquire(timeout=timeout), "a request did not finish"
    return outputs
