"""Qwen agents in other frameworks' shapes: transformers' HF Agent LLM hook and the plugin benchmark's records.

- :class:`HfAgentLLM` is the official ``examples/transformers_agent.md`` ``generate_one`` (transformers'
  ``Agent`` subclass hook) over any chat function: our local model, or ``qwen serve`` through the
  OpenAI client. The prompt's ``Human:`` / ``Assistant:`` are rewritten to ``_HUMAN_:`` /
  ``_ASSISTANT_:`` (old Qwen tokenizers treated them as reserved words), the reply is cut at the first
  stop string (the official cut only a stop string at the very end, so text the model wrote after a
  stop leaked into the agent's code) and the rewrite undone. transformers 5 removed ``Agent``; its
  run/chat prompt templates still run through ``generate_one``; with transformers < 4.50, mix it in:
  ``class QWenAgent(HfAgentLLM, transformers.Agent)``.
- :func:`plugin_records` turns agent results into the records ``qwen.eval.plugin.score_records``
  scores (tool selection accuracy, Rouge-L of the action input, false-positive rate).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from .backends import cut_at_stop

ChatFn = Callable[[str, Sequence[str]], str]  # (prompt, stop strings) -> reply


def _to_qwen(text: str) -> str:
    return text.replace("Human:", "_HUMAN_:").replace("Assistant:", "_ASSISTANT_:")


def _from_qwen(text: str) -> str:
    return text.replace("_HUMAN_:", "Human:").replace("_ASSISTANT_:", "Assistant:")


class HfAgentLLM:
    """``generate_one`` / ``generate_many`` of a transformers Agent, answered by a Qwen-Chat model."""

    def __init__(self, chat: ChatFn) -> None:
        self.chat = chat

    @classmethod
    def local(cls, model: Any, tokenizer: Any, **gen_kwargs: Any) -> "HfAgentLLM":
        """A model in this process (greedy by default, as the official example sets do_sample=False)."""
        from ..chat import chat

        settings = {"do_sample": False, **gen_kwargs}

        def run(prompt: str, stop: Sequence[str]) -> str:
            return chat(model, tokenizer, prompt, history=None, **settings)[0]  # generate_one cuts at `stop`

        return cls(run)

    @classmethod
    def openai(cls, base_url: str = "http://127.0.0.1:8000/v1", model: str = "qwen", api_key: str = "none",
               client: Any = None, **sampling: Any) -> "HfAgentLLM":
        """An OpenAI-compatible server (``qwen serve``): one user message per prompt, ``stop`` sent along."""
        if client is None:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key=api_key)
        settings = {"temperature": 0, **sampling}

        def run(prompt: str, stop: Sequence[str]) -> str:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               stop=list(stop)[:4] or None, **settings)
            return r.choices[0].message.content or ""

        return cls(run)

    def generate_one(self, prompt: str, stop: Sequence[str]) -> str:
        stops = [_to_qwen(s) for s in stop]
        reply = cut_at_stop(self.chat(_to_qwen(prompt), stops), stops)
        return _from_qwen(reply)

    def generate_many(self, prompts: Sequence[str], stop: Sequence[str]) -> list[str]:
        return [self.generate_one(p, stop) for p in prompts]


def plugin_records(results: Sequence[Any], references: Sequence[str | Mapping[str, Any] | None]) -> list[dict]:
    """Records for ``qwen.eval.plugin.score_records``: one per agent result, ``references[i]`` the reference
    ReAct trace (str, or a benchmark record with ``response``) where a tool should be called, None where
    none should (a negative item)."""
    if len(results) != len(references):
        raise ValueError(f"{len(results)} agent results for {len(references)} references")
    out = []
    for result, ref in zip(results, references):
        gen = getattr(result, "response", result)
        if ref is None:
            out.append({"kind": "negative", "gen": gen})
        else:
            out.append({"kind": "positive", "gen": gen, "response": ref if isinstance(ref, str) else ref["response"]})
    return out


__all__ = ["HfAgentLLM", "plugin_records"]
