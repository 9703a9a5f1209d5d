"""The ChatML prompt format of Qwen-Chat, shared by inference (chat, server) and SFT.

Prompts are built token by token, never by encoding the rendered string: each role name and
content is BPE'd on its own with special tokens disabled (injection-safe), exactly as the official
`make_context` (spec §8.1). Encoding the whole string can give different ids (e.g. "\\n\\n" merges).
`render_messages` produces the same ids for OpenAI-style message lists plus the SFT loss mask.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
IM_START_ID, IM_END_ID, EOD_ID = 151644, 151645, 151643
DEFAULT_SYSTEM = "You are a helpful assistant."
# Generation ends at either ChatML marker; generate() then appends eos like the official processor.
CHATML_STOP_WORDS_IDS: list[list[int]] = [[IM_END_ID], [IM_START_ID]]

HistoryType = list[tuple[str, str]]


def _ids(tokenizer: Any) -> tuple[int, int, int]:
    return (
        getattr(tokenizer, "im_start_id", IM_START_ID),
        getattr(tokenizer, "im_end_id", IM_END_ID),
        getattr(tokenizer, "eod_id", EOD_ID),
    )


class _Encoder:
    """The token helpers of make_context: S(x) encodes with no special tokens allowed."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.im_start, self.im_end, _ = _ids(tokenizer)
        self.nl = tokenizer.encode("\n")

    def text(self, x: str) -> list[int]:
        return list(self.tok.encode(x, allowed_special=set()))

    def turn(self, role: str, content: str) -> tuple[list[int], list[int]]:
        """<|im_start|>role\\ncontent<|im_end|>, as (head ids, content ids + <|im_end|>)."""
        head = [self.im_start] + self.text(role) + self.nl
        return head, self.text(content) + [self.im_end]

    def generation_prompt(self) -> list[int]:
        # The official code encodes this last "assistant" with the default encode; same ids.
        return self.nl + [self.im_start] + list(self.tok.encode("assistant")) + self.nl


def make_context(
    tokenizer: Any,
    query: str,
    history: Sequence[Sequence[str]] | None = None,
    system: str = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """The prompt for ``query`` after ``history``: (raw_text, context_tokens), as the official code.

    History turns are kept newest first while system + kept turns + the next turn stay strictly
    below ``max_window_size`` tokens; the first turn that does not fit drops it and every older
    one. The current query is not counted in that budget.
    """
    history = list(history or [])
    if chat_format == "raw":
        return query, list(tokenizer.encode(query))
    if chat_format != "chatml":
        raise NotImplementedError(f"unknown chat format {chat_format!r} (expected 'chatml' or 'raw')")

    enc = _Encoder(tokenizer)
    head, body = enc.turn("system", system)
    system_tokens = head + body
    system_text = f"{IM_START}system\n{system}{IM_END}"

    kept_tokens: list[int] = []
    kept_text = ""
    for turn_query, turn_response in reversed(history):
        uh, ub = enc.turn("user", turn_query)
        ah, ab = enc.turn("assistant", turn_response)
        turn_tokens = enc.nl + uh + ub + enc.nl + ah + ab
        if len(system_tokens) + len(turn_tokens) + len(kept_tokens) < max_window_size:
            kept_tokens = turn_tokens + kept_tokens
            kept_text = (
                f"\n{IM_START}user\n{turn_query}{IM_END}\n{IM_START}assistant\n{turn_response}{IM_END}" + kept_text
            )
        else:
            break

    qh, qb = enc.turn("user", query)
    context_tokens = system_tokens + kept_tokens + enc.nl + qh + qb + enc.generation_prompt()
    raw_text = system_text + kept_text + f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"
    return raw_text, context_tokens


def render_messages(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
    default_system: str | None = DEFAULT_SYSTEM,
) -> tuple[list[int], list[int]]:
    """ChatML ids and an SFT loss mask for OpenAI-style ``[{"role", "content"}, ...]`` messages.

    Roles: system, user, assistant, and any other name (e.g. "function") rendered as its own
    ChatML turn. Without a leading system message, ``default_system`` is used (None: no system
    turn). For a (system, user, assistant, ..., user) list the ids equal make_context's.
    loss_mask is 1 exactly on assistant content tokens and their <|im_end|>.
    """
    enc = _Encoder(tokenizer)
    msgs = list(messages)
    if default_system is not None and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": default_system})

    ids: list[int] = []
    mask: list[int] = []
    for msg in msgs:
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"every message needs a 'role' string, got {msg!r}")
        content = msg.get("content") or ""
        if not isinstance(content, str):
            raise TypeError(f"message content must be a string (got {type(content).__name__} for role {role!r})")
        head, body = enc.turn(role, content)
        sep = enc.nl if ids else []  # turns are joined by "\n"
        supervised = 1 if role == "assistant" else 0
        ids += sep + head + body
        mask += [0] * (len(sep) + len(head)) + [supervised] * len(body)
    if add_generation_prompt:
        prompt = enc.generation_prompt()
        if not ids:  # no previous turn to separate from
            prompt = prompt[len(enc.nl):]
        ids += prompt
        mask += [0] * len(prompt)
    return ids, mask


def get_stop_words_ids(chat_format: str, tokenizer: Any) -> list[list[int]]:
    """Token sequences that end a reply: ChatML markers, or "Human:" and <|endoftext|> for raw."""
    im_start, im_end, eod = _ids(tokenizer)
    if chat_format == "raw":
        return [list(tokenizer.encode("Human:")), [eod]]
    if chat_format == "chatml":
        return [[im_end], [im_start]]
    raise NotImplementedError(f"unknown chat format {chat_format!r} (expected 'chatml' or 'raw')")


def decode_tokens(
    tokens: torch.Tensor | Sequence[int],
    tokenizer: Any,
    raw_text_len: int,
    context_length: int,
    chat_format: str,
    verbose: bool = False,
    return_end_reason: bool = False,
    errors: str = "replace",
) -> str | tuple[str, str]:
    """The reply text in prompt + generated ``tokens`` (spec §8.2), stripped.

    chatml: cut at the first <|im_start|>/<|im_end|> (or <|endoftext|>) after the prompt.
    raw: drop every <|endoftext|>. Differences from the official helper, on purpose:
    - when no marker is found the official loop variable stops at len-1 and silently drops the last
      generated token (harmless only when that token is eos). We keep every generated token and
      cut at <|endoftext|> explicitly instead.
    - we decode only the generated ids instead of decoding the prompt too and slicing off
      ``raw_text_len`` characters: same text whenever the official alignment holds, and still
      right when it does not (e.g. non-NFC input). ``raw_text_len`` is kept for call compatibility.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.reshape(-1).tolist()
    tokens = list(tokens)
    generated = tokens[context_length:]
    im_start, im_end, eod = _ids(tokenizer)

    end_reason = f"Gen length {len(tokens)}"  # the official counts the prompt too
    if chat_format == "chatml":
        cut = len(generated)
        for i, t in enumerate(generated):
            if t in (im_start, im_end, eod):
                cut = i
                end_reason = f"Gen {tokenizer.decode([t])!r}"
                break
        text = tokenizer.decode(generated[:cut], errors=errors).strip()
    elif chat_format == "raw":
        text = tokenizer.decode(generated, errors=errors)
        # The official removes <|endoftext|> before its truncation step, which therefore never fires
        # (nor does its end-reason detection).
        text = text.replace(ENDOFTEXT, "").strip()
    else:
        raise NotImplementedError(f"unknown chat format {chat_format!r} (expected 'chatml' or 'raw')")

    if verbose:
        print("\nRaw Generate:", tokenizer.decode(generated, errors=errors))
        print("\nEnd Reason:", end_reason)
    return (text, end_reason) if return_end_reason else text
