"""The tool-use (ReAct plugin) benchmark for chat models, generated and scored as the official
eval/evaluate_plugin.py does it.

Data: the two JSON-lines files of the released benchmark (v20231206:
``exam_plugin_v20231206_react_positive.jsonl`` and ``..._react_negative.jsonl``; the older v1 files
have the same layout). Each line is an object with

- ``prompt``: the complete user message. The ReAct instruction (tool descriptions, the
  Thought/Action/Action Input/Observation format, ``Begin!``) and the question are already in it;
  the script builds no prompt of its own and neither do we.
- ``response``: the reference ReAct completion (``Thought: ...\\nAction: NAME\\nAction Input: {...}``,
  possibly followed by ``Observation:`` and a final answer). Needed in the positive file; the
  negative file is scored on the model's output alone.

Other keys are carried along and ignored.

Generation: one chat turn per record, what ``model.chat(tokenizer, prompt, history=None)`` returns:
the default system prompt, no history, and no extra stop words (the reply ends at ``<|im_end|>``;
a made-up ``Observation:`` and whatever follows stay in the text, and the parser cuts them off).
Greedy; every other setting comes from the checkpoint's generation_config, as in the official
script, which only switches ``do_sample`` off (so Qwen-Chat decodes with repetition_penalty 1.1 and
at most its ``max_new_tokens``, 512).

Parsing (:func:`parse_react_fields`): the official ``process_res``: each field is the text between
the first occurrence of its marker and the first occurrence of the next one (``rfind`` for the
last ``Thought:``), after a newline has been appended to the text; a missing marker's index -1 is
used as it is (see the function). The Action Input is then normalised: parsed with ``json5`` and
re-serialised with sorted keys (non-ASCII kept), or ``""`` when it does not parse.

Metrics, in percent (the script prints fractions; ``results["official"]`` has them that way):

- ``action_right_rate`` (tool selection accuracy, positive set): the output contains
  ``"\\nAction: "`` and its action equals the reference's, case-insensitively.
- ``action_input_rouge`` (positive set): Rouge-L F1 between the normalised Action Inputs, where a
  "word" is a Qwen token: each string is encoded, each token's bytes decoded as UTF-8 (errors
  replaced), the pieces joined by spaces and split on whitespace again (so whitespace-only tokens
  vanish and leading spaces fall off). An unparsable input on either side scores 0. Averaged over
  all positive records, whether or not the action was right.
- ``bad_rate`` (false positives, negative set): the share of outputs containing ``"\\nAction: "``.

The script's third part, ``--eval-hfagent`` (transformers' ``evaluate_agent`` through a
``transformers.Agent`` subclass), is not reproduced: that agent API was removed from transformers
and its tools download models at run time. Where else we differ: docs/evaluation.md.

Resumable: each generated reply is appended to ``{output}/items/plugin/0-shot/{file stem}.jsonl``
after its batch; a rerun generates only the missing ones and rescores everything from the cached
text, so a change to scoring never needs new generations.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..checkpoint import progress_bar
from ..generate import suppress_ids_from, tokenizer_vocab_limit
from . import generation

POSITIVE_FILE = "exam_plugin_v20231206_react_positive.jsonl"
NEGATIVE_FILE = "exam_plugin_v20231206_react_negative.jsonl"
KINDS = ("positive", "negative")
TOOL_CALL_MARK = "\nAction: "  # what counts as "the model called a tool" in both sets

# Markers of process_res, in the order the fields appear in a ReAct trace.
_ACTION, _INPUT, _OBS, _THOUGHT, _FINAL = "Action:", "Action Input:", "Observation:", "Thought:", "Final Answer:"


class PluginDataError(ValueError):
    """Plugin benchmark data that cannot be used (names the file and the line)."""


# ------------------------------------------------------------------------------------------ parsing
def normalize_action_input(text: str) -> str:
    """The Action Input as the official script compares it: parsed as JSON5 and written back as JSON
    with sorted keys and non-ASCII kept, or ``""`` when it does not parse."""
    json5 = _json5()
    try:
        value = json5.loads(text)
    except Exception:  # the official catches everything: any unparsable input is just ""
        return ""
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        return ""


def parse_react_fields(text: str, normalize: bool = True) -> dict[str, str]:
    """thought, action, action_input, observation, thought_last, final_answer, by the official rules.

    Every field is a slice between two ``str.find`` results taken on ``text + "\\n"``. The official
    slices with an index of -1 when a marker is missing, and so do we, because the scores depend on
    it: without ``Action:`` the thought is the whole text and the "action" starts at character 6;
    without ``Action Input:`` the action runs to the end; without ``Observation:`` the input runs to
    the end (the appended newline is what index -1 cuts off). Only the first Action is read.
    """
    t = text + "\n"
    a, ai, obs = t.find(_ACTION), t.find(_INPUT), t.find(_OBS)
    last_thought, final = t.rfind(_THOUGHT), t.find(_FINAL)
    action_input = t[ai + len(_INPUT):obs].strip()
    return {
        "thought": t[:a].strip(),
        "action": t[a + len(_ACTION):ai].strip(),
        "action_input": normalize_action_input(action_input) if normalize else action_input,
        "observation": t[obs + len(_OBS):last_thought].strip(),
        "thought_last": t[last_thought + len(_THOUGHT):final].strip(),
        "final_answer": t[final + len(_FINAL):].strip(),
    }


def parse_react_output(text: str) -> tuple[str, str, str]:
    """(thought, action, normalised action input) of a ReAct reply, as the official eval parses it.

    Not ``qwen.serve.react.parse_response``: the server needs ``"\\nAction:"`` before
    ``"\\nAction Input:"`` to see a call and returns the raw argument text, while the benchmark's
    parser searches bare markers, slices with -1 for missing ones and JSON5-normalises the input;
    the numbers depend on exactly those rules.
    """
    f = parse_react_fields(text)
    return f["thought"], f["action"], f["action_input"]


def is_tool_call(text: str) -> bool:
    """The official test for "the reply calls a tool": it contains ``"\\nAction: "``."""
    return TOOL_CALL_MARK in text


# ------------------------------------------------------------------------------------------ Rouge-L
_DEFAULT_TOKENIZER: Any = None


def _default_tokenizer() -> Any:
    # Every Qwen(-Chat) checkpoint has the same vocabulary, so the bundled one scores like any of them.
    global _DEFAULT_TOKENIZER
    if _DEFAULT_TOKENIZER is None:
        from ..tokenizer import QWenTokenizer

        _DEFAULT_TOKENIZER = QWenTokenizer()
    return _DEFAULT_TOKENIZER


def token_words(text: str, tokenizer: Any = None) -> list[str]:
    """The "words" Rouge-L sees: Qwen token pieces, space-joined and split on whitespace again."""
    tok = tokenizer if tokenizer is not None else _default_tokenizer()
    pieces = []
    for token in tok.convert_ids_to_tokens(tok.encode(text)):
        # A special token comes back as str (the official would fail on it); it is its own piece.
        pieces.append(token.decode("utf-8", errors="replace") if isinstance(token, bytes) else token)
    return " ".join(pieces).split()


def rouge_l_f1(reference: Sequence[str], prediction: Sequence[str]) -> float:
    """Rouge-L F1 of two word lists, computed as ``rouge_score``'s rougeL (0 if either is empty)."""
    if not reference or not prediction:
        return 0.0
    # Longest common subsequence, one row of the table at a time.
    row = [0] * (len(prediction) + 1)
    for r in reference:
        prev_diag = 0
        for j, p in enumerate(prediction, 1):
            keep = row[j]
            row[j] = prev_diag + 1 if r == p else max(row[j], row[j - 1])
            prev_diag = keep
    lcs = row[-1]
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def action_input_rouge(reference: str, prediction: str, tokenizer: Any = None) -> float:
    """Rouge-L F1 of the normalised Action Inputs of two ReAct replies (reference first)."""
    ref = parse_react_fields(reference)["action_input"]
    pred = parse_react_fields(prediction)["action_input"]
    return rouge_l_f1(token_words(ref, tokenizer), token_words(pred, tokenizer))


def action_right(reference: str, prediction: str) -> bool:
    """Tool selection: the prediction calls a tool and names the reference's, ignoring case."""
    if not is_tool_call(prediction):
        return False
    return parse_react_fields(prediction, False)["action"].lower() == parse_react_fields(reference, False)["action"].lower()


# ------------------------------------------------------------------------------------------ scoring
def _prediction(record: Mapping[str, Any]) -> str:
    gen = record.get("gen")
    if isinstance(gen, (list, tuple)):  # the official cache stores [reply]
        gen = gen[0] if gen else ""
    if not isinstance(gen, str):
        raise PluginDataError(f"record {record.get('index', '?')}: 'gen' must be the model's reply (a string)")
    return gen


def score_item(record: Mapping[str, Any], kind: str, tokenizer: Any = None) -> dict[str, Any]:
    """Per-record scores: called (both kinds); action_right and rouge_l (positive)."""
    gen = _prediction(record)
    out: dict[str, Any] = {"called": is_tool_call(gen)}
    if kind == "positive":
        ref = record.get("response")
        if not isinstance(ref, str):
            raise PluginDataError(f"record {record.get('index', '?')}: a positive record needs the reference 'response'")
        out["action_right"] = action_right(ref, gen)
        out["rouge_l"] = action_input_rouge(ref, gen, tokenizer)
    return out


def _kind_of(record: Mapping[str, Any], default: str | None) -> str:
    kind = record.get("kind", default)
    if kind not in KINDS:
        raise PluginDataError(f"record {record.get('index', '?')}: kind must be 'positive' or 'negative' "
                              f"(a 'kind' key or the kind= argument), got {kind!r}")
    return kind


def official_summary(scored: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """What evaluate_plugin.py prints (fractions, computed in its order), for the sets present, from
    per-record scores (``kind`` plus what :func:`score_item` returns)."""
    n_pos = n_neg = right = bad = 0
    rouge_terms: list[float] = []
    for s in scored:
        if s["kind"] == "positive":
            n_pos += 1
            right += bool(s["action_right"])
            rouge_terms.append(float(s["rouge_l"]))
        else:
            n_neg += 1
            bad += bool(s["called"])
    out: dict[str, dict[str, float]] = {}
    if n_pos:
        rouge = 0.0
        for r in rouge_terms:  # the official adds rouge / n record by record
            rouge += r / n_pos
        out["react_positive"] = {"action_right_rate": right / n_pos, "action_input_rouge": rouge}
    if n_neg:
        out["react_negative"] = {"bad_rate": bad / n_neg}
    return out


def aggregate(scored: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The benchmark's numbers in percent from per-record scores: action_right_rate and
    action_input_rouge over the positive records, bad_rate over the negative ones (NaN for a set
    with no records), n_positive and n_negative."""
    scored = list(scored)
    official = official_summary(scored)
    pos, neg = official.get("react_positive", {}), official.get("react_negative", {})
    return {
        "action_right_rate": 100.0 * pos.get("action_right_rate", math.nan),
        "action_input_rouge": 100.0 * pos.get("action_input_rouge", math.nan),
        "bad_rate": 100.0 * neg.get("bad_rate", math.nan),
        "n_positive": sum(s["kind"] == "positive" for s in scored),
        "n_negative": sum(s["kind"] == "negative" for s in scored),
    }


def score_records(records: Iterable[Mapping[str, Any]], tokenizer: Any = None, *,
                  kind: str | None = None) -> dict[str, float]:
    """The benchmark's numbers (see :func:`aggregate`) over records holding the model's reply ``gen``
    (a string, or the official cache's one-element list) and, for positive records, the reference
    ``response``: the official ``.cache`` files, our items/ files joined with their data, or an
    agent's own transcripts.

    A record's set is its ``kind`` key ("positive": a tool should be called; "negative": none
    should), else ``kind``. The tokenizer (for Rouge-L) defaults to the bundled Qwen vocabulary.
    """
    scored = []
    for rec in records:
        k = _kind_of(rec, kind)
        scored.append({"kind": k, **score_item(rec, k, tokenizer)})
    return aggregate(scored)


# --------------------------------------------------------------------------------------------- data
def _json5() -> Any:
    try:
        import json5
    except ImportError as e:
        raise ImportError("the plugin benchmark parses Action Inputs with JSON5, as the official script does: "
                          "pip install json5") from e
    return json5


def kind_of_file(path: str | os.PathLike) -> str:
    """"positive" or "negative", from the file name (as the released files are named)."""
    name = Path(path).name.lower()
    found = [k for k in KINDS if k in name]
    if len(found) != 1:
        raise PluginDataError(f"{path}: cannot tell whether this is the positive set (a tool should be called) "
                              "or the negative set: the file name must contain 'positive' or 'negative'")
    return found[0]


def read_records(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of one benchmark file; each needs a ``prompt`` string, positive ones a ``response``."""
    p = Path(path)
    kind = kind or kind_of_file(p)
    if not p.is_file():
        raise PluginDataError(f"{p}: no such file (the {kind} set of the plugin benchmark, e.g. "
                              f"{POSITIVE_FILE if kind == 'positive' else NEGATIVE_FILE})")
    records = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PluginDataError(f"{p}: line {lineno}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise PluginDataError(f"{p}: line {lineno}: expected an object with a 'prompt' string")
            if kind == "positive" and not isinstance(rec.get("response"), str):
                raise PluginDataError(f"{p}: line {lineno}: a positive record needs the reference 'response' string")
            records.append(rec)
    return records


def find_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(kind, path) of the files to score: the given file(s), or in a directory the v20231206 pair,
    else its only ``*positive*.jsonl`` / ``*negative*.jsonl``. Positive first."""
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    found: dict[str, Path] = {}
    for item in map(Path, paths):
        if item.is_dir():
            for kind, default in (("positive", POSITIVE_FILE), ("negative", NEGATIVE_FILE)):
                if (item / default).is_file():
                    candidates = [item / default]
                else:
                    candidates = sorted(f for f in item.glob("*.jsonl") if _kind_or_none(f) == kind)
                if len(candidates) > 1:
                    raise PluginDataError(f"{item}: several {kind} files {[c.name for c in candidates]}: "
                                          "pass the ones to score")
                if candidates:
                    _add(found, kind, candidates[0])
        else:
            if not item.is_file():
                raise PluginDataError(f"{item}: no such file or directory (the plugin benchmark data: "
                                      f"{POSITIVE_FILE} and/or {NEGATIVE_FILE})")
            _add(found, kind_of_file(item), item)
    if not found:
        raise PluginDataError(f"{data}: no plugin benchmark files ({POSITIVE_FILE}, {NEGATIVE_FILE})")
    return [(k, found[k]) for k in KINDS if k in found]


def _kind_or_none(path: Path) -> str | None:
    try:
        return kind_of_file(path)
    except PluginDataError:
        return None


def _add(found: dict[str, Path], kind: str, path: Path) -> None:
    if kind in found and found[kind].resolve() != path.resolve():
        raise PluginDataError(f"two {kind} files given: {found[kind]} and {path}")
    found[kind] = path


# --------------------------------------------------------------------------------------- generation
def _read_cache(path: Path) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                if isinstance(rec.get("gen"), str):
                    done[int(rec["index"])] = rec
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                continue  # a line cut by an interrupted write: generated again
    return done


def generate_replies(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                     batch_size: int = 8, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """``model.chat(tokenizer, prompt, history=None)`` for each prompt (greedy, the default system
    prompt, stripped reply), in left-padded batches."""
    cfg = getattr(model, "generation_config", None)
    window = getattr(cfg, "max_window_size", None) or 6144
    ids = [generation.chat_prompt_ids(tokenizer, p, None, max_window_size=window) for p in prompts]
    limit = tokenizer_vocab_limit(tokenizer)
    # model.chat never samples the padded embedding rows that the tokenizer cannot decode.
    guard = [suppress_ids_from(limit)] if limit and limit < model.config.vocab_size else []
    from ..chat_template import get_stop_words_ids

    new = generation.generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                  stop_words_ids=get_stop_words_ids("chatml", tokenizer), batch_size=batch_size,
                                  on_batch=on_batch, do_sample=False, logits_processor=guard)
    return [tokenizer.decode(n, errors="replace").strip() for n in new]


def evaluate_file(model: Any, tokenizer: Any, kind: str, records: Sequence[Mapping[str, Any]], *,
                  cache_file: Path | None, max_new_tokens: int, batch_size: int = 8,
                  on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Per-record {index, kind, gen, called[, action_right, rouge_l]}, generated where not cached."""
    done = _read_cache(cache_file) if cache_file else {}
    # Longest prompts first, so a batch's rows need little padding (the cache is keyed by index).
    todo = sorted((i for i in range(len(records)) if i not in done), key=lambda i: -len(records[i]["prompt"]))
    if on_batch and len(records) - len(todo):
        on_batch(len(records) - len(todo))
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        replies = generate_replies(model, tokenizer, [records[i]["prompt"] for i in batch],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
        lines = []
        for i, reply in zip(batch, replies):
            rec = {"index": i, "kind": kind, "gen": reply}
            rec.update(score_item({**records[i], "gen": reply}, kind, tokenizer))
            done[i] = rec
            lines.append(json.dumps(rec, ensure_ascii=False))
        if cache_file:
            with open(cache_file, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        if on_batch:
            on_batch(len(batch))
    out = []
    for i in range(len(records)):
        # Rescored from the cached reply: the reference comes from the data file, not the cache.
        rec = {"index": i, "kind": kind, "gen": done[i]["gen"]}
        rec.update(score_item({**records[i], "gen": rec["gen"]}, kind, tokenizer))
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------ results
def markdown_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per run: tool selection, Rouge-L of the Action Input, false positives (percent)."""
    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    lines = ["| model | tool selection (action_right_rate) | action input Rouge-L | false positives (bad_rate) "
             "| positive items | negative items |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.get('model', '')} | {cell(r.get('action_right_rate'))} | {cell(r.get('action_input_rouge'))} "
                     f"| {cell(r.get('bad_rate'))} | {r.get('n_positive', 0)} | {r.get('n_negative', 0)} |")
    return "\n".join(lines) + "\n\nAll numbers in percent (Rouge-L x 100); lower is better for false positives.\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def run(model: Any, tokenizer: Any, data: str | os.PathLike | Sequence[str | os.PathLike],
        output: str | os.PathLike, *, limit: int | None = None, batch_size: int = 8, progress: bool = True,
        model_label: str = "model", max_new_tokens: int | None = None) -> dict[str, Any]:
    """Generate and score the plugin benchmark; writes items/, results-plugin.json and .md to ``output``.

    ``data``: a directory with the released files, or the file(s) themselves (the set is read from
    the name: ``positive`` / ``negative``). ``limit``: the first N records of each file.
    ``max_new_tokens``: default the checkpoint's generation_config (512 for Qwen-Chat).
    """
    _json5()  # fail before generating, not after
    files = find_files(data)
    if max_new_tokens is None:
        cfg = getattr(model, "generation_config", None)
        max_new_tokens = getattr(cfg, "max_new_tokens", None) or 512
    loaded = [(kind, path, read_records(path, kind)[:limit]) for kind, path in files]
    out = Path(output)
    bar = progress_bar(sum(len(r) for _, _, r in loaded), "plugin", progress, unit="item")
    start = time.perf_counter()
    items: list[dict[str, Any]] = []
    for kind, path, records in loaded:
        items += evaluate_file(model, tokenizer, kind, records, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               cache_file=out / "items" / "plugin" / "0-shot" / f"{path.stem}.jsonl",
                               on_batch=bar.update)
    bar.close()
    scores = aggregate(items)
    result: dict[str, Any] = {"task": "plugin", "model": model_label, "average": scores["action_right_rate"],
                              **scores, "official": official_summary(items),
                              "files": {kind: str(path) for kind, path, _ in loaded}, "limit": limit,
                              "max_new_tokens": max_new_tokens, "items": len(items),
                              "seconds": round(time.perf_counter() - start, 2)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results-plugin.json.tmp"
    tmp.write_text(json.dumps(_json_safe(result), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "results-plugin.json")
    (out / "results-plugin.md").write_text(markdown_table([result]), encoding="utf-8")
    return result


__all__ = ["POSITIVE_FILE", "NEGATIVE_FILE", "KINDS", "PluginDataError", "normalize_action_input",
           "parse_react_fields", "parse_react_output", "is_tool_call", "token_words", "rouge_l_f1",
           "action_input_rouge", "action_right", "score_item", "aggregate", "score_records", "official_summary",
           "kind_of_file", "read_records", "find_files", "generate_replies", "evaluate_file", "markdown_table", "run"]
