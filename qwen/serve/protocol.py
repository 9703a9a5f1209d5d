"""OpenAI request validation and the messages -> ChatML prompt conversion.

Everything here is pure (no HTTP, no model): it turns a decoded JSON body into engine inputs or
raises :class:`APIError` with OpenAI's error shape and the right status code.

Differences from the official ``openai_api.py`` (docs/differences.md, serving section): a system
message may appear anywhere (later ones become their own ChatML system turn instead of a 400);
``tool`` messages and assistant ``tool_calls`` map onto the same ReAct Observation/Action text as
the legacy ``function`` role; content may be a list of text parts; nothing is dropped to fit the
context window (the request is refused with the numbers instead).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..chat_template import DEFAULT_SYSTEM, render_messages
from .react import OBSERVATION_STOP, react_instruction


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                             429: "rate_limit_error"}.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


# ---------------------------------------------------------------------------------------------- fields
def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False, default: Any = None,
            lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        lo_txt = f"> {lo}" if lo_open else f">= {lo}"
        raise bad(f"'{name}' must be {lo_txt} and <= {hi}, got {v!r}", name)
    return int(v) if integer else float(v)


@dataclass
class Sampling:
    """The sampling fields common to both endpoints (None: use the checkpoint's generation config)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None off; k: chosen token + top k
    ignore_eos: bool = False  # extension (as vLLM): generate max_tokens tokens; for benchmarks


def parse_sampling(body: dict, *, max_n: int = 16, chat: bool = True) -> Sampling:
    s = Sampling()
    s.temperature = _number(body, "temperature", 0, 2)
    s.top_p = _number(body, "top_p", 0, 1, lo_open=True)
    top_k = _number(body, "top_k", -1, 10**9, integer=True)
    s.top_k = None if top_k is None else max(0, top_k)  # -1 (vLLM) and 0 both mean off
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        field_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        s.max_tokens = _number({field_name: max_tokens}, field_name, 1, 10**9, integer=True)
    s.n = _number(body, "n", 1, max_n, integer=True, default=1)
    s.seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    if s.seed is not None:
        s.seed %= 2**63
    s.repetition_penalty = _number(body, "repetition_penalty", 0, 10, lo_open=True)
    s.presence_penalty = _number(body, "presence_penalty", -2, 2, default=0.0)
    s.frequency_penalty = _number(body, "frequency_penalty", -2, 2, default=0.0)
    stop = body.get("stop")
    if stop is None:
        s.stop = []
    elif isinstance(stop, str):
        s.stop = [stop]
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop) and len(stop) <= 16:
        s.stop = list(stop)
    else:
        raise bad("'stop' must be a string or a list of at most 16 strings", "stop")
    s.stop = [x for x in s.stop if x]
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("'ignore_eos' must be a boolean", "ignore_eos")
    s.ignore_eos = ignore_eos
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    s.stream = stream
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        s.include_usage = bool(opts.get("include_usage", False))
    if chat:
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise bad("'logprobs' must be a boolean", "logprobs")
        top = _number(body, "top_logprobs", 0, 20, integer=True)
        if top is not None and not lp:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        s.logprobs = (top or 0) if lp else None
    else:
        s.logprobs = _number(body, "logprobs", 0, 5, integer=True)
    return s


# ---------------------------------------------------------------------------------------------- messages
ROLES = ("system", "user", "assistant", "function", "tool")


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}",
                          f"messages[{i}].content")
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _strip(s: str) -> str:
    return s.lstrip("\n").rstrip()  # as the official server


def tools_to_functions(body: dict) -> tuple[list[dict], str]:
    """The request's tools as legacy function dicts, and the API style ("functions" | "tools" | "")."""
    functions, tools = body.get("functions"), body.get("tools")
    if functions is not None and tools is not None:
        raise bad("send either 'functions' or 'tools', not both", "tools")
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            raise bad("'tools' must be a non-empty list", "tools")
        out = []
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict) \
                    or not isinstance(t["function"].get("name"), str):
                raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}", f"tools[{i}]")
            out.append(t["function"])
        choice = body.get("tool_choice", "auto")
        if choice == "none":
            return [], ""
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            chosen = [f for f in out if f["name"] == name]
            if not chosen:
                raise bad(f"tool_choice names {name!r}, which is not in 'tools'", "tool_choice")
            out = chosen
        elif choice not in ("auto", "required"):
            raise bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', ...}", "tool_choice")
        return out, "tools"
    if functions is not None:
        if not isinstance(functions, list) or not functions or not all(
                isinstance(f, dict) and isinstance(f.get("name", f.get("name_for_model")), str) for f in functions):
            raise bad("'functions' must be a non-empty list of objects with a 'name'", "functions")
        choice = body.get("function_call", "auto")
        if choice == "none":
            return [], ""
        if isinstance(choice, dict):
            chosen = [f for f in functions if f.get("name") == choice.get("name")]
            if not chosen:
                raise bad(f"function_call names {choice.get('name')!r}, which is not in 'functions'", "function_call")
            functions = chosen
        return list(functions), "functions"
    return [], ""


@dataclass
class ChatPrompt:
    ids: list[int]
    functions: list[dict]
    api_style: str  # "functions", "tools" or "" (no function calling)
    continuation: bool  # the last message was a function/tool result: the assistant turn stays open
    stop: list[str]


def build_chat_prompt(tokenizer: Any, body: dict) -> ChatPrompt:
    """Validate ``messages`` (and functions/tools) and render the ChatML prompt ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    functions, style = tools_to_functions(body)
    instruction = react_instruction(functions) if functions else ""

    system = DEFAULT_SYSTEM
    turns: list[dict[str, str]] = []  # role/content in ChatML order, after the ReAct rewriting
    pending_calls: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}", f"messages[{i}].role")
        content = _strip(_content(msg, i))
        if role == "system":
            if i == 0:
                system = content
            else:
                turns.append({"role": "system", "content": content})
        elif role == "user":
            turns.append({"role": "user", "content": content})
        elif role == "assistant":
            calls = _assistant_calls(msg, i)
            if calls:
                name, args = calls[0]
                pending_calls = calls[1:]
                thought = content if content.startswith("Thought:") else f"Thought: {content}"
                content = f"{thought}\nAction: {name}\nAction Input: {args}"
            elif functions:
                content = f"Thought: I now know the final answer.\nFinal Answer: {content}"
            if turns and turns[-1]["role"] == "assistant":
                turns[-1]["content"] += "\n" + content
            elif not any(t["role"] == "user" for t in turns):
                raise bad(f"messages[{i}]: an assistant message needs a user message before it", f"messages[{i}]")
            else:
                turns.append({"role": "assistant", "content": _strip(content)})
        else:  # function / tool result: an Observation inside the previous assistant turn
            if not turns or turns[-1]["role"] != "assistant":
                raise bad(f"messages[{i}]: a {role} message must follow an assistant message", f"messages[{i}]")
            turns[-1]["content"] += f"\nObservation: {content}"
            if pending_calls:
                name, args = pending_calls.pop(0)
                turns[-1]["content"] += f"\nAction: {name}\nAction Input: {args}"
    if not any(t["role"] == "user" for t in turns):
        raise bad("'messages' needs at least one user message", "messages")

    continuation = messages[-1].get("role") in ("function", "tool")
    if continuation:
        turns[-1]["content"] += "\nThought:"
    # Where the official server puts the ReAct instruction: into the user side of the latest
    # completed (user, assistant) exchange (react_demo.py's multi-turn layout), or into the new
    # question when there is no such exchange.
    if instruction:
        answered = [j for j in range(len(turns) - 1) if turns[j]["role"] == "user" and turns[j + 1]["role"] == "assistant"]
        target = answered[-1] if answered else max(j for j, t in enumerate(turns) if t["role"] == "user")
        turns[target] = {"role": "user", "content": f"{instruction}\n\nQuestion: {turns[target]['content']}"}

    msgs = [{"role": "system", "content": system}] + turns
    if continuation:
        head, _ = render_messages(tokenizer, msgs[:-1], add_generation_prompt=True, default_system=None)
        ids = head + list(tokenizer.encode(msgs[-1]["content"], allowed_special=set()))
    else:
        if turns[-1]["role"] != "user":
            raise bad("the last message must be from the user (or a function/tool result)", "messages")
        ids, _ = render_messages(tokenizer, msgs, add_generation_prompt=True, default_system=None)
    stop = [OBSERVATION_STOP] if functions else []
    return ChatPrompt(ids, functions, style, continuation, stop)


def _assistant_calls(msg: dict, i: int) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    fc = msg.get("function_call")
    if fc is not None:
        if not isinstance(fc, dict) or not isinstance(fc.get("name"), str):
            raise bad(f"messages[{i}].function_call must be {{'name', 'arguments'}}", f"messages[{i}].function_call")
        calls.append((fc["name"], _args(fc.get("arguments", ""))))
    for j, tc in enumerate(msg.get("tool_calls") or []):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"messages[{i}].tool_calls[{j}] must carry a function name", f"messages[{i}].tool_calls")
        calls.append((fn["name"], _args(fn.get("arguments", ""))))
    return calls


def _args(a: Any) -> str:
    return a if isinstance(a, str) else json.dumps(a, ensure_ascii=False)


def completion_prompts(tokenizer: Any, body: dict) -> list[list[int]]:
    """``prompt`` of /v1/completions: a string, a list of strings, a token list or a list of them."""
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    if not isinstance(p, list) or not p:
        raise bad("'prompt' must be a non-empty string, list of strings or list of token ids", "prompt")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        p = [p]
    out = []
    for i, x in enumerate(p):
        if isinstance(x, str):
            ids = list(tokenizer.encode(x, allowed_special=set()))
        elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            limit = len(tokenizer)
            badid = next((t for t in x if not 0 <= t < limit), None)
            if badid is not None:
                raise bad(f"prompt[{i}] has token id {badid}, outside the vocabulary [0, {limit})", "prompt")
            ids = list(x)
        else:
            raise bad(f"prompt[{i}] must be a string or a non-empty list of token ids", "prompt")
        if not ids:
            raise bad(f"prompt[{i}] is empty", "prompt")
        out.append(ids)
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def logprob_entry(tokenizer: Any, token_id: int, logprob: float, top: Sequence[tuple[int, float]]) -> dict:
    def one(t: int, lp: float) -> dict:
        raw = tokenizer.convert_ids_to_tokens(t)
        b = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    entry = one(token_id, logprob)
    entry["top_logprobs"] = [one(t, lp) for t, lp in top]
    return entry
