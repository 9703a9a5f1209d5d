"""EleutherAI lm-evaluation-harness (lm-eval 0.4.x) on our engine: the model type ``qwen``.

    python -m qwen.eval.harness --model qwen --model_args pretrained=DIR,batch_size=8 --tasks hellaswag

takes exactly lm-eval's arguments: it registers the adapter, then runs lm-eval's own command line.
A plain ``lm_eval --model qwen`` cannot work: lm-eval 0.4.13 looks models up in its registry, which
it fills from its own table (lm_eval/models/__init__.py) and from modules that were imported, and it
reads no entry points, so no installed package can add a model to the ``lm_eval`` command. From
Python: ``register()`` then ``lm_eval.simple_evaluate(model="qwen", model_args=...)``, or pass a
``QwenLM(...)`` instance as ``model``.

``--model_args`` (comma separated key=value): ``pretrained`` (any checkpoint directory we load: plain,
GPTQ, LoRA adapter, or a registered name such as qwen-demo), ``batch_size`` (default 8),
``device`` (default cuda when present, else cpu; ``auto`` spreads the layers over the GPUs), ``dtype`` (auto: bf16/fp16 on a GPU, fp32 on the
CPU; or float32 / bfloat16 / float16), ``max_length`` (default the config's
``max_position_embeddings``, as lm-eval's HF model reads it), ``max_gen_toks`` (default 256), and any
other ``from_pretrained`` option (``use_dynamic_ntk=False``, ``quant_kernel=dequant``, ...). A value
given in ``--model_args`` wins over lm-eval's own ``--batch_size`` / ``--device`` (whose defaults
would otherwise collide with it).

The three request types, as lm-eval's HF model (HFLM) computes them:

- ``loglikelihood``: context and continuation are encoded together and split where the context's
  own tokens end (trailing spaces of the context move to the continuation); an empty context
  becomes ``<|endoftext|>`` (Qwen has no BOS). The input is context + continuation without its
  last token, cut from the left to ``max_length``; the answer is the sum of the continuation's
  log-probabilities and whether greedy decoding would produce it token by token. Requests with the
  same input tokens (one-token answers of a multiple-choice question) share one forward.
- ``loglikelihood_rolling``: the text's tokens in disjoint windows of ``max_length`` predictions,
  the first conditioned on ``<|endoftext|>``, each later one on the ``max_length`` tokens before its
  last prediction (lm-eval's rolling windows with context length 1); the windows' sums are added.
- ``generate_until``: greedy unless the task samples (``do_sample``, ``temperature``, ``top_p``,
  ``top_k`` ... go to our ``generate``, the checkpoint's generation_config underneath, as HF's
  generate uses it), at most ``max_gen_toks`` new tokens, the prompt cut from the left to
  ``max_length - max_gen_toks``, the text cut at the first of ``until`` (plus ``<|endoftext|>``).

Forwards run in left-padded batches (each row computes as it would alone; positions and dynamic
NTK count real tokens only), longest first, and the log-softmax is taken in fp32 a slice of
positions at a time, so a long window never materialises [batch, length, 151936] logits.
``--apply_chat_template`` renders ChatML as ``model.chat`` does (default system prompt when the
conversation has none).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

_HEAD_ROWS = 256  # positions per lm_head slice
_ADAPTER: Any = None
_NO_LM_EVAL = "the lm-eval adapter needs EleutherAI's harness: pip install lm-eval==0.4.13"
_DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def _lm_eval_api() -> tuple[Any, Any]:
    try:
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError(_NO_LM_EVAL) from e
    return TemplateLM, register_model


def _positive_int(name: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}"
                         + (" (automatic batch sizes are not supported)" if str(value).startswith("auto") else ""))
    if n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def _normalize_gen_kwargs(gen_kwargs: dict[str, Any], default_max: int) -> tuple[list[str], int, dict[str, Any]]:
    """(until, max new tokens, the rest for generate), with lm-eval's rules for aliases and greedy."""
    kw = dict(gen_kwargs)
    until = kw.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    budget = None
    for alias in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):  # priority order
        v = kw.pop(alias, None)
        if budget is None and v is not None:
            budget = int(v)
    temperature = float(kw.get("temperature", 0.0) or 0.0)
    do_sample = kw.get("do_sample")
    if do_sample is None:
        do_sample = temperature > 0.0
    kw["do_sample"] = bool(do_sample)
    if not kw["do_sample"]:
        kw.pop("temperature", None)  # greedy: a temperature means nothing (and 0 is not a valid one)
    kw.pop("max_length", None)  # HF's prompt + new length; max_gen_toks is the budget here
    return until, default_max if budget is None else budget, kw


def adapter_class() -> type:
    """The ``lm_eval.api.model.TemplateLM`` subclass for our models (built once; needs lm-eval)."""
    global _ADAPTER
    if _ADAPTER is not None:
        return _ADAPTER
    TemplateLM, _ = _lm_eval_api()

    import torch

    class QwenLM(TemplateLM):  # type: ignore[misc, valid-type]
        """lm-eval's LM interface over a qwen model (see the module docstring)."""

        backend = "causal"

        def __init__(self, pretrained: Any = None, *, model: Any = None, tokenizer: Any = None,
                     batch_size: Any = 8, max_batch_size: Any = None, device: str | None = None,
                     dtype: str = "auto", max_length: Any = None, max_gen_toks: Any = 256,
                     **load_kwargs: Any) -> None:
            super().__init__()
            from .. import AutoModelForCausalLM, AutoTokenizer

            if model is None and not isinstance(pretrained, (str, bytes)) and pretrained is not None:
                model, pretrained = pretrained, None  # a loaded model passed as pretrained (as HFLM allows)
            if model is None:
                if pretrained is None:
                    raise ValueError("--model_args needs pretrained=DIR (a checkpoint directory)")
                if str(dtype) not in _DTYPES:
                    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
                for k in ("trust_remote_code", "parallelize", "revision", "use_fast_tokenizer"):
                    load_kwargs.pop(k, None)  # HF loader options lm-eval users habitually pass
                if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                    # lm-eval's CLI passes cuda:0 by default; like its HF model, fall back to the CPU.
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                model = AutoModelForCausalLM.from_pretrained(str(pretrained), device_map=device,
                                                             torch_dtype=_DTYPES[str(dtype)], **load_kwargs)
            elif load_kwargs:
                raise ValueError(f"loading options {sorted(load_kwargs)} need pretrained=DIR, not a loaded model")
            self._model = model.eval()
            if tokenizer is None or isinstance(tokenizer, str):
                source = tokenizer or pretrained
                if source is None:
                    raise ValueError("pass tokenizer= with a loaded model")
                tokenizer = AutoTokenizer.from_pretrained(str(source))
            self.tokenizer = tokenizer
            self.pretrained = None if pretrained is None else str(pretrained)
            self._batch_size = _positive_int("batch_size", batch_size)
            cfg = model.config
            self._max_length = _positive_int("max_length", max_length) if max_length is not None else int(
                getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", None) or 2048)
            self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
            self._device = next(model.parameters()).device

        # ---- construction from lm-eval's argument strings: --model_args beats the CLI's defaults
        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> Any:
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
            return cls(**arg_dict, **extra)

        # ---- what lm-eval asks of a model
        @property
        def eot_token_id(self) -> int:
            return int(self.tokenizer.eod_id)

        @property
        def prefix_token_id(self) -> int:
            return int(self.tokenizer.eod_id)  # Qwen has no BOS: <|endoftext|> conditions an empty context

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def max_gen_toks(self) -> int:
            return self._max_gen_toks

        @property
        def batch_size(self) -> int:
            return self._batch_size

        @property
        def device(self) -> Any:
            return self._device

        @property
        def model(self) -> Any:
            return self._model

        @property
        def tokenizer_name(self) -> str:
            return "qwen"

        def chat_template(self, chat_template: Any = False) -> str | None:
            if chat_template is False or chat_template is None:
                return None
            return "chatml (qwen model.chat)"

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            from ..chat_template import DEFAULT_SYSTEM

            turns = list(chat_history)
            if not turns or turns[0].get("role") != "system":
                turns.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
            parts = [f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>" for t in turns]
            if add_generation_prompt:
                return "\n".join(parts) + "\n<|im_start|>assistant\n"
            # Continue the last (assistant) message: leave it open.
            return "\n".join(parts)[: -len("<|im_end|>")]

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            ids = list(self.tokenizer.encode(string))
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
            return self.tokenizer.decode(list(tokens), errors="replace")

        def get_model_info(self) -> dict[str, Any]:
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(next(self._model.parameters()).dtype), "model_name": self.pretrained or ""}

        # ---- scoring
        def _score_inputs(self, inputs: Sequence[tuple[int, ...]], wanted: Sequence[list[list[int]]]) -> list[list[tuple[float, bool]]]:
            """For each input row and each continuation in ``wanted[row]`` (tokens predicted by the row's
            last len(cont) positions): (sum of log-probs, greedy). One left-padded forward."""
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eod_id if pad is None else pad
            width = max(len(s) for s in inputs)
            ids = torch.full((len(inputs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(inputs), width), dtype=torch.long)
            for r, s in enumerate(inputs):
                ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[r, width - len(s):] = 1
            with torch.no_grad():
                hidden, _ = self._model.transformer(ids.to(self._device), attention_mask=mask.to(self._device))
                head = self._model.lm_head
                try:
                    head_device = next(head.parameters()).device
                except StopIteration:
                    head_device = hidden.device
                out = []
                for r, conts in enumerate(wanted):
                    k = max(len(c) for c in conts)
                    rows = hidden[r, width - k:].to(head_device)
                    logp_parts, greedy_parts = [], []
                    for i in range(0, k, _HEAD_ROWS):
                        logits = head(rows[i:i + _HEAD_ROWS]).float()
                        logp_parts.append(logits.log_softmax(-1))
                        greedy_parts.append(logits.argmax(-1))
                    logp = torch.cat(logp_parts) if len(logp_parts) > 1 else logp_parts[0]
                    greedy = torch.cat(greedy_parts) if len(greedy_parts) > 1 else greedy_parts[0]
                    res = []
                    for cont in conts:
                        target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                        lp, gr = logp[k - len(cont):], greedy[k - len(cont):]
                        res.append((float(lp.gather(-1, target[:, None]).sum()), bool((gr == target).all())))
                    out.append(res)
                    del logp, greedy, logp_parts, greedy_parts
            return out

        def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                                  disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            # Input = (context + continuation)[-(max_length + 1):][:-1]; requests with equal inputs share a forward.
            groups: dict[tuple[int, ...], list[int]] = {}
            conts: list[list[int]] = []
            for n, (_, context_enc, continuation_enc) in enumerate(requests):
                if not context_enc or not continuation_enc:
                    raise ValueError("a loglikelihood request needs context and continuation tokens")
                if len(continuation_enc) > self._max_length:
                    raise ValueError(f"a continuation of {len(continuation_enc)} tokens exceeds max_length "
                                     f"{self._max_length}")
                whole = (list(context_enc) + list(continuation_enc))[-(self._max_length + 1):]
                groups.setdefault(tuple(whole[:-1]), []).append(n)
                conts.append(list(continuation_enc))
            order = sorted(groups, key=lambda inp: (-len(inp), inp))
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            bar = _bar(len(requests), "loglikelihood", disable_tqdm)
            for start in range(0, len(order), self._batch_size):
                batch = order[start:start + self._batch_size]
                scored = self._score_inputs(batch, [[conts[n] for n in groups[inp]] for inp in batch])
                for inp, answers in zip(batch, scored):
                    for n, answer in zip(groups[inp], answers):
                        results[n] = answer
                        key = requests[n][0]
                        if key is not None:  # rolling windows carry None: cached per document instead
                            self.cache_hook.add_partial("loglikelihood", key, answer)
                    bar.update(len(groups[inp]))
            bar.close()
            assert all(r is not None for r in results)
            return results  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            windows: list[tuple[None, list[int], list[int]]] = []
            owner: list[int] = []
            for n, (string,) in enumerate(req.args for req in requests):
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self._max_length, context_len=1)):
                    windows.append((None, ctx, cont))
                    owner.append(n)
            scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
            totals = [0.0] * len(requests)
            for n, (logp, _) in zip(owner, scores):
                totals[n] += logp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        # ---- generation
        def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
            from ..generate import suppress_ids_from, tokenizer_vocab_limit
            from .generation import generate_ids

            eos = self.tok_decode([self.eot_token_id])
            limit = tokenizer_vocab_limit(self.tokenizer)
            guard = [suppress_ids_from(limit)] if limit and limit < self._model.config.vocab_size else []
            # Requests with the same generation settings run together (greedy and sampled never share a batch).
            groups: dict[str, list[int]] = {}
            for n, req in enumerate(requests):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
            results: list[str] = [""] * len(requests)
            bar = _bar(len(requests), "generate_until", disable_tqdm)
            for members in groups.values():
                until, budget, gen_kwargs = _normalize_gen_kwargs(requests[members[0]].args[1], self._max_gen_toks)
                if budget >= self._max_length:
                    raise ValueError(f"max_gen_toks {budget} must be below max_length {self._max_length}")
                if eos not in until:
                    until.append(eos)
                prompts = [self.tok_encode(requests[n].args[0]) for n in members]
                new = generate_ids(self._model, self.tokenizer, prompts, max_new_tokens=budget,
                                   stop_strings=[u for u in until if u], batch_size=self._batch_size,
                                   max_seq_len=self._max_length, on_batch=bar.update,
                                   stop_words_ids=[[self.tokenizer.im_end_id]], logits_processor=guard, **gen_kwargs)
                for n, ids in zip(members, new):
                    text = self.tok_decode(ids)
                    for term in until:
                        if term:
                            text = text.split(term)[0]
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
            bar.close()
            return results

    QwenLM.__module__ = __name__
    _ADAPTER = QwenLM
    return QwenLM


def _bar(total: int, desc: str, disable: bool) -> Any:
    from ..checkpoint import progress_bar

    return progress_bar(total, desc, not disable, unit="req", leave=False)


def register(name: str = "qwen") -> type:
    """Register the adapter in lm-eval's model registry (idempotent) and return its class."""
    cls = adapter_class()
    _, register_model = _lm_eval_api()
    import lm_eval.models  # noqa: F401  lm-eval's own models first: it skips that import once the registry is non-empty
    from lm_eval.api.registry import model_registry

    if name not in model_registry or model_registry.get(name) is not cls:
        register_model(name)(cls)
    return cls


def __getattr__(name: str) -> Any:
    if name == "QwenLM":  # the class exists only once lm-eval is importable
        return adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None, cli: Callable[[], Any] | None = None) -> Any:
    """``python -m qwen.eval.harness ARGS``: lm-eval's command line with the ``qwen`` model registered."""
    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if cli is None:
        from lm_eval.__main__ import cli_evaluate as cli
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        return cli()
    finally:
        sys.argv = saved


__all__ = ["adapter_class", "register", "main"]

if __name__ == "__main__":
    main()
