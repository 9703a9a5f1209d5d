"""The lm-evaluation-harness adapter (qwen/eval/harness.py) on local task data only.

The expected log-likelihoods are computed here straight from the model's logits (one unpadded
forward per request, the context/continuation split and the rolling windows written out by hand
from lm-eval's documented rules), not through the adapter. Nothing is downloaded: the tasks are
YAML files with ``dataset_path: json`` over JSON-lines files in tmp, and the HF hub is switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Before lm_eval (and so datasets / huggingface_hub) is imported: never touch the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "qwen-tests-hf-datasets"))

import pytest  # noqa: E402
import torch  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from qwen import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from qwen.eval import harness  # noqa: E402
from qwen.generate import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    tok = AutoTokenizer.from_pretrained("qwen-demo")
    model = AutoModelForCausalLM.from_pretrained("qwen-demo", progress=False).eval()
    return model, tok


@pytest.fixture(scope="module")
def adapter(demo):  # type: ignore[no-untyped-def]
    cls = harness.register()
    model, tok = demo
    return lambda **kw: cls(model=model, tokenizer=tok, **kw)


def _ll(args: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]


def _direct(model, ids: list[int], n_ctx: int) -> tuple[float, bool]:  # type: ignore[no-untyped-def]
    """Sum of log p(ids[i] | ids[:i]) for i >= n_ctx, and whether each was the argmax (one forward)."""
    with torch.no_grad():
        logp = model(torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)
    total = sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
    greedy = all(int(logp[i - 1].argmax()) == ids[i] for i in range(n_ctx, len(ids)))
    return total, greedy


# ------------------------------------------------------------------------------------ registration
def test_registered_as_qwen_next_to_lm_evals_own_models() -> None:
    from lm_eval.api.registry import get_model, model_registry

    cls = harness.register()
    assert harness.register() is cls  # idempotent
    assert get_model("qwen") is cls and harness.QwenLM is cls
    assert "hf" in model_registry and "dummy" in model_registry


def test_module_imports_without_lm_eval() -> None:
    script = ("import sys; sys.modules['lm_eval'] = None\nimport qwen.eval.harness as h\n"
              "try:\n    h.adapter_class()\nexcept ImportError as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pip install lm-eval==0.4.13" in proc.stdout


def test_model_args_beat_the_cli_defaults(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    cls = harness.register()
    lm = cls.create_from_arg_obj({"model": model, "tokenizer": tok, "batch_size": "3", "max_length": 64},
                                 {"batch_size": 1, "max_batch_size": None, "device": None})
    assert (lm.batch_size, lm.max_length, lm.max_gen_toks) == (3, 64, 256)
    assert cls(model=model, tokenizer=tok).max_length == model.config.max_position_embeddings
    with pytest.raises(ValueError, match="automatic batch sizes are not supported"):
        cls(model=model, tokenizer=tok, batch_size="auto")


# ---------------------------------------------------------------------------------- loglikelihood
REQUESTS = [
    ("Question: 1+1=\nAnswer:", " 2"), ("Question: 1+1=\nAnswer:", " 3"), ("Question: 1+1=\nAnswer:", " two"),
    ("The cat ", "sat on the mat"),  # the trailing space moves to the continuation
    ("", "hello world"),             # empty context: <|endoftext|> conditions it
    ("北京是", "中国的首都。"), ("A long context about nothing in particular, " * 3, "and then it ends."),
]


def test_loglikelihood_matches_the_logits(demo, adapter) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    got = adapter(batch_size=4).loglikelihood(_ll(REQUESTS), disable_tqdm=True)
    for (ctx, cont), (logp, greedy) in zip(REQUESTS, got):
        if ctx:
            spaces = len(ctx) - len(ctx.rstrip())
            ctx, cont = ctx[: len(ctx) - spaces], ctx[len(ctx) - spaces:] + cont
            # lm-eval's split: the continuation is what encoding the whole adds past the context's own
            # token count; the model then reads the context's own tokens followed by it.
            ctx_ids = tok.encode(ctx)
            whole, n_ctx = ctx_ids + tok.encode(ctx + cont)[len(ctx_ids):], len(ctx_ids)
        else:
            whole, n_ctx = [tok.eod_id] + tok.encode(cont), 1
        want, want_greedy = _direct(model, whole, n_ctx)
        assert logp == pytest.approx(want, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy


def test_loglikelihood_batch_equals_single(adapter) -> None:  # type: ignore[no-untyped-def]
    batched = adapter(batch_size=8).loglikelihood(_ll(REQUESTS), disable_tqdm=True)
    single = adapter(batch_size=1).loglikelihood(_ll(REQUESTS), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_greedy_flag_on_the_models_own_continuation(demo, adapter) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    ctx = "1+1="
    ids = tok.encode(ctx)
    out = generate(model, torch.tensor([ids]), max_new_tokens=3, do_sample=False, repetition_penalty=1.0)
    cont = tok.decode(out[0, len(ids):].tolist())
    assert tok.encode(ctx + cont)[len(ids):] == out[0, len(ids):].tolist()  # the text round-trips to these tokens
    ((_, greedy),) = adapter().loglikelihood(_ll([(ctx, cont)]), disable_tqdm=True)
    assert greedy is True


def test_long_inputs_are_cut_from_the_left(demo, adapter) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    ctx, cont = "one two three four five six seven eight nine ten", " eleven"
    whole = tok.encode(ctx + cont)
    n_cont = len(whole) - len(tok.encode(ctx))
    lm = adapter(max_length=6)
    (logp, _), = lm.loglikelihood(_ll([(ctx, cont)]), disable_tqdm=True)
    kept = whole[-7:]  # max_length + 1 tokens; the last is only predicted
    assert logp == pytest.approx(_direct(model, kept, len(kept) - n_cont)[0], abs=1e-4)


# -------------------------------------------------------------------------------------- rolling
TEXT = "The quick brown fox jumps over the lazy dog. 北京欢迎你！ Numbers: 1 2 3 4 5 6 7 8 9 10."


def _rolling_direct(model, tokens: list[int], eod: int, window: int) -> float:  # type: ignore[no-untyped-def]
    """Windows of `window` predictions: the first on <|endoftext|> + the text, each later one on the
    `window` tokens just before its last prediction."""
    total, done = 0.0, 0
    while done < len(tokens):
        n = min(window, len(tokens) - done)
        end = done + n
        if done == 0:
            inp = [eod] + tokens[: end - 1]
        else:
            inp = tokens[end - 1 - window: end - 1]
        ids = inp + [tokens[end - 1]]  # _direct scores ids[n_ctx:], predicted from the positions before
        total += _direct(model, ids, len(ids) - n)[0]
        done = end
    return total


def test_rolling_loglikelihood_matches_windows_by_hand(demo, adapter) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    tokens = tok.encode(TEXT)
    assert len(tokens) > 20
    req = [Instance("loglikelihood_rolling", {}, (TEXT,), 0), Instance("loglikelihood_rolling", {}, ("short",), 1)]
    for window, bs in ((8, 3), (512, 2)):
        got = adapter(max_length=window, batch_size=bs).loglikelihood_rolling(req, disable_tqdm=True)
        assert got[0] == pytest.approx(_rolling_direct(model, tokens, tok.eod_id, window), abs=1e-3)
        assert got[1] == pytest.approx(_direct(model, [tok.eod_id] + tok.encode("short"), 1)[0], abs=1e-4)


# ------------------------------------------------------------------------------------- generation
def test_generate_until_is_greedy_generate_cut_at_until(demo, adapter) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    prompts = ["1+1=", "Hello, my name is", "北京是"]
    kwargs = {"until": ["\n", "。"], "max_gen_toks": 6, "do_sample": False}
    reqs = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
    got = adapter(batch_size=3).generate_until(reqs, disable_tqdm=True)
    single = adapter(batch_size=1).generate_until(reqs, disable_tqdm=True)
    assert got == single
    for p, text in zip(prompts, got):
        ids = tok.encode(p)
        out = generate(model, torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        want = tok.decode([t for t in out[0, len(ids):].tolist() if t not in (tok.eod_id, tok.im_end_id)])
        for u in ("\n", "。"):
            want = want.split(u)[0]
        assert text == want


def test_generation_kwargs_are_normalised() -> None:
    until, budget, kw = harness._normalize_gen_kwargs({"until": "Q:", "max_new_tokens": 7, "temperature": 0.0}, 256)
    assert (until, budget, kw) == (["Q:"], 7, {"do_sample": False})
    until, budget, kw = harness._normalize_gen_kwargs({"temperature": 0.7, "top_p": 0.9, "max_gen_toks": 3,
                                                       "max_tokens": 9}, 256)
    assert (until, budget, kw) == ([], 3, {"temperature": 0.7, "top_p": 0.9, "do_sample": True})


def test_sampling_runs(adapter) -> None:  # type: ignore[no-untyped-def]
    req = [Instance("generate_until", {}, ("1+1=", {"do_sample": True, "temperature": 0.8, "max_gen_toks": 3}), 0)]
    (text,) = adapter().generate_until(req, disable_tqdm=True)
    assert isinstance(text, str)


def test_chat_template_is_chatml() -> None:
    lm = object.__new__(harness.register())
    chat = [{"role": "user", "content": "Hi"}]
    assert lm.apply_chat_template(chat) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "The answer is"}]
    assert lm.apply_chat_template(chat, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nThe answer is")


# ------------------------------------------------------------------------ lm-eval tasks, local data
def _tasks(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    (data / "mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"question": "1+1=", "choices": ["2", "3", "4"], "answer": 0},
        {"question": "2+2=", "choices": ["3", "4", "5"], "answer": 1},
        {"question": "中国的首都是", "choices": ["北京", "上海"], "answer": 0},
    ]), encoding="utf-8")
    (data / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "1+1=", "answer": "2"}, {"question": "3+4=", "answer": "7"}]), encoding="utf-8")
    (data / "text.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"text": TEXT}, {"text": "A second, shorter document."}]), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()

    def yaml(name: str, file: str, body: str) -> None:
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / file}\n"
            f"test_split: test\n{body}", encoding="utf-8")

    yaml("qwen_tiny_mc", "mc.jsonl", 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
         'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n')
    yaml("qwen_tiny_gen", "gen.jsonl", 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
         'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n  do_sample: false\n'
         'metric_list:\n  - metric: exact_match\n')
    yaml("qwen_tiny_ppl", "text.jsonl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')
    return tasks


def test_simple_evaluate_on_local_tasks(demo, adapter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lm_eval.tasks import TaskManager

    model, tok = demo
    tasks = _tasks(tmp_path)
    lm = adapter(batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["qwen_tiny_mc", "qwen_tiny_gen", "qwen_tiny_ppl"],
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  log_samples=True, verbosity="ERROR")
    res = out["results"]
    assert 0.0 <= res["qwen_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["qwen_tiny_gen"]["exact_match,none"] <= 1.0
    assert res["qwen_tiny_ppl"]["word_perplexity,none"] > 1.0
    # The multiple-choice scores lm-eval saw are the model's own log-probabilities.
    sample = out["samples"]["qwen_tiny_mc"][0]
    for choice, resp in zip(["2", "3", "4"], sample["resps"]):
        whole = tok.encode("Question: 1+1=\nAnswer: " + choice)
        want = _direct(model, whole, len(tok.encode("Question: 1+1=\nAnswer:")))[0]
        assert resp[0][0] == pytest.approx(want, abs=1e-4)
    # The rolling total of the first document is the windowed sum (one window at max_length 512).
    ppl = out["samples"]["qwen_tiny_ppl"]
    first = next(s for s in ppl if s["doc"]["text"] == TEXT)
    assert first["resps"][0][0] == pytest.approx(_direct(model, [tok.eod_id] + tok.encode(TEXT), 1)[0], abs=1e-3)


@pytest.mark.slow
def test_command_line(tmp_path: Path) -> None:
    tasks = _tasks(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "qwen.eval.harness", "--model", "qwen", "--model_args", "pretrained=qwen-demo,batch_size=4",
         "--tasks", "qwen_tiny_mc,qwen_tiny_gen", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qwen_tiny_mc" in proc.stdout and "acc" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))
