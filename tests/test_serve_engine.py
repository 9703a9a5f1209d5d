"""The continuous-batching engine: batched == alone, joins/leaves at token granularity, per-request
seeds, stop strings across token boundaries, cancellation, back-pressure; and the RowKVCache."""

from __future__ import annotations

import threading

import pytest
import torch

from qwen import AutoModelForCausalLM, AutoTokenizer
from qwen.cache import RowKVCache
from qwen.chat_template import render_messages
from qwen.config import preset_config
from qwen.model import QWenLMHeadModel
from qwen.sampling import SamplingParams
from qwen.serve.engine import Engine, QueueFull, RequestParams
from serve_helpers import submit_together

QUESTIONS = ["你好", "Hello", "What is the capital of France?", "法国的首都是哪里？", "12+34等于多少？", "Who are you?",
             "床前明月光的下一句是什么？", "What is 5 + 7?", "日本的首都是哪里？", "Hi", "What is the capital of Peru?",
             "你是谁？", "23+45等于多少？", "What is 60 - 13?", "《静夜思》的作者是谁？", "Good morning"]


@pytest.fixture(scope="module")
def demo() -> tuple[object, object]:
    return AutoModelForCausalLM.from_pretrained("qwen-demo"), AutoTokenizer.from_pretrained("qwen-demo")


@pytest.fixture(scope="module")
def engine(demo):  # type: ignore[no-untyped-def]
    model, tok = demo
    with Engine(model, tok, max_batch_size=16) as eng:
        yield eng


def prompt(tok, q: str) -> list[int]:  # type: ignore[no-untyped-def]
    return render_messages(tok, [{"role": "user", "content": q}])[0]


def greedy(tok, n: int = 24, **kw) -> RequestParams:  # type: ignore[no-untyped-def]
    return RequestParams(max_new_tokens=n, stop_token_ids=[tok.im_end_id, tok.im_start_id, tok.eod_id], **kw)


def run_concurrently(engine: Engine, jobs: list[tuple[list[int], RequestParams]]) -> list[tuple[str, list[int], str]]:
    out: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i: int) -> None:
        barrier.wait()
        out[i] = engine.generate(*jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_sixteen_concurrent_greedy_requests_equal_their_single_runs(demo, engine) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    prompts = [prompt(tok, q) for q in QUESTIONS]
    alone = [engine.generate(p, greedy(tok)) for p in prompts]
    steps_before = engine.stats.decode_steps
    rows_before = engine.stats.batch_size_sum
    together = run_concurrently(engine, [(p, greedy(tok)) for p in prompts])
    assert [t[1] for t in together] == [a[1] for a in alone]
    assert [t[0] for t in together] == [a[0] for a in alone]
    # They really ran batched: on average several rows per decode step.
    steps = engine.stats.decode_steps - steps_before
    assert (engine.stats.batch_size_sum - rows_before) / steps > 4
    # And the engine's greedy output is the plain generate() output (same tokens, stop included).
    ref = model.generate(torch.tensor([prompts[2]]), max_new_tokens=24, do_sample=False)[0, len(prompts[2]):].tolist()
    assert alone[2][1] == ref[: len(alone[2][1])]


def test_prompts_arriving_together_are_prefilled_in_batches(demo, engine) -> None:  # type: ignore[no-untyped-def]
    _, tok = demo
    prompts = [prompt(tok, q) for q in QUESTIONS]
    alone = [engine.generate(p, greedy(tok, 12)) for p in prompts]
    before = engine.stats.prefill_batches
    outputs = submit_together(engine, prompts, greedy(tok, 12))  # all 16 admitted in one iteration
    assert outputs == [a[1] for a in alone]  # left-padded batched prefill == each prompt alone
    batches = engine.stats.prefill_batches - before
    assert batches <= 4, f"16 prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens took {batches} prefills"


def test_long_prompt_arriving_mid_stream_is_prefilled_in_chunks(demo) -> None:  # type: ignore[no-untyped-def]
    _, tok = demo
    running_p = prompt(tok, QUESTIONS[2])
    long_q = "请逐句背诵《静夜思》，然后告诉我法国、日本和秘鲁的首都分别是哪里，再算一下12+34等于多少。" * 3
    long_p = prompt(tok, long_q)
    assert len(long_p) > 100
    with Engine(*demo, max_batch_size=4, prefill_chunk=16) as eng:
        running_ref = eng.generate(running_p, greedy(tok, 40, ignore_eos=True))
        long_ref = eng.generate(long_p, greedy(tok, 12))
        started = threading.Event()
        result: dict = {}

        def first() -> None:
            ids: list[int] = []
            for ev in eng.stream(running_p, greedy(tok, 40, ignore_eos=True)):
                ids += ev.token_ids
                if len(ids) >= 3:
                    started.set()
            result["running"] = ids

        t = threading.Thread(target=first)
        t.start()
        assert started.wait(60)
        before = eng.stats.prefill_batches
        _, long_ids, _ = eng.generate(long_p, greedy(tok, 12))
        chunks = eng.stats.prefill_batches - before
        t.join()
    # The long prompt went in 16-token chunks, one per decode step of the other stream (37 steps left).
    assert chunks == -(-len(long_p) // 16), (chunks, len(long_p))
    assert long_ids == long_ref[1]  # chunked prefill == one-call prefill
    assert result["running"] == running_ref[1]


def test_requests_join_and_leave_a_running_batch(demo, engine) -> None:  # type: ignore[no-untyped-def]
    _, tok = demo
    long_p, short_p = prompt(tok, QUESTIONS[2]), prompt(tok, QUESTIONS[0])
    long_ref = engine.generate(long_p, greedy(tok, 60, ignore_eos=True))
    short_ref = engine.generate(short_p, greedy(tok, 5, ignore_eos=True))
    got: dict[str, tuple] = {}
    events = engine.stream(long_p, greedy(tok, 60, ignore_eos=True))
    text = [next(events).text for _ in range(10)]  # the long request is decoding...
    got["short"] = engine.generate(short_p, greedy(tok, 5, ignore_eos=True))  # ...a short one joins and leaves
    rest = list(events)
    assert got["short"][1] == short_ref[1]
    assert "".join(text + [e.text for e in rest]) == long_ref[0]
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 60


def test_per_request_seeds_in_one_batch(demo, engine) -> None:  # type: ignore[no-untyped-def]
    _, tok = demo
    p = prompt(tok, "Tell me something.")
    sampling = SamplingParams(do_sample=True, temperature=2.0)
    mk = lambda seed: greedy(tok, 20, sampling=sampling, seed=seed, ignore_eos=True)  # noqa: E731
    alone = engine.generate(p, mk(7))
    batch = run_concurrently(engine, [(p, mk(7)), (p, mk(8)), (p, mk(7)), (prompt(tok, "Hi"), mk(7)), (p, mk(9)),
                                      (p, mk(10))])
    assert batch[0][1] == alone[1] and batch[2][1] == alone[1]
    # Other seeds, other draws (20 tokens at temperature 2; one of three differing is enough).
    assert any(batch[i][1] != alone[1] for i in (1, 4, 5))


def test_stop_string_across_token_boundaries_never_leaks(demo, engine) -> None:  # type: ignore[no-untyped-def]
    _, tok = demo
    p = prompt(tok, "Hello")
    full, ids, _ = engine.generate(p, greedy(tok, 30))
    # Pick a stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode([t]) for t in ids]
    assert len(pieces) >= 6
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = full[start:start + len(pieces[2]) + 2]
    assert len(stop) >= 3
    deltas = list(engine.stream(p, greedy(tok, 30, stop=[stop])))
    text = "".join(e.text for e in deltas)
    assert text == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    sent = ""
    for e in deltas:  # no delta ever shows characters of the stop string
        sent += e.text
        assert stop[0] not in sent[len(full[: full.index(stop)]):]


def test_max_new_tokens_gives_length(demo, engine) -> None:  # type: ignore[no-untyped-def]
    _, tok = demo
    text, ids, reason = engine.generate(prompt(tok, "Hello"), greedy(tok, 3))
    assert reason == "length" and len(ids) == 3 and text == tok.decode(ids)


def test_context_window_is_checked_with_numbers(demo, engine) -> None:  # type: ignore[no-untyped-def]
    _, tok = demo
    with pytest.raises(ValueError, match=r"512 tokens.*20 prompt tokens.*600 new tokens"):
        engine.submit(prompt(tok, "你好")[:20], greedy(tok, 600), lambda e: None)


def test_cancel_frees_the_row_for_the_next_request(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    with Engine(model, tok, max_batch_size=1) as eng:
        stream = eng.stream(prompt(tok, "Hello"), greedy(tok, 400, ignore_eos=True))
        next(stream)
        next(stream)
        stream.close()  # the consumer goes away: cancels the request
        text, ids, reason = eng.generate(prompt(tok, "你好"), greedy(tok, 8, ignore_eos=True))
        assert len(ids) == 8 and reason == "length"
        assert eng.stats.cancelled == 1
        assert eng.stats.generation_tokens < 400  # the cancelled one did not run to its end


def test_bounded_queue_rejects_with_queue_full(demo) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    eng = Engine(model, tok, max_batch_size=1, max_queue=2)
    eng._thread = threading.current_thread()  # accept submissions without a worker: nothing drains the queue
    for _ in range(2):
        eng.submit(prompt(tok, "Hi"), greedy(tok, 4), lambda e: None)
    with pytest.raises(QueueFull) as info:
        eng.submit(prompt(tok, "Hi"), greedy(tok, 4), lambda e: None)
    assert info.value.retry_after_s >= 1 and eng.stats.rejected == 1


def test_logprobs_are_log_softmax_of_the_model(demo, engine) -> None:  # type: ignore[no-untyped-def]
    model, tok = demo
    p = prompt(tok, "Hello")
    events = list(engine.stream(p, greedy(tok, 3, logprobs=2, ignore_eos=True)))
    lps = [lp for e in events for lp in e.logprobs]
    assert len(lps) == 3
    logits = model(torch.tensor([p])).logits[0, -1].float()
    ref = torch.log_softmax(logits, -1)
    assert lps[0].token_id == int(ref.argmax())
    assert abs(lps[0].logprob - float(ref.max())) < 1e-4
    assert [t for t, _ in lps[0].top] == ref.topk(2).indices.tolist()


# ------------------------------------------------------------------ RowKVCache
def test_row_cache_decode_matches_padded_batch_decode() -> None:
    torch.manual_seed(0)
    model = QWenLMHeadModel(preset_config("tiny")).eval()
    model.init_weights(seed=1)
    prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (5, 11, 2)]
    rows = RowKVCache(model, max_rows=4, capacity=4)  # small: exercises growth
    refs = []
    with torch.no_grad():
        for p in prompts:
            cache = model.new_cache(1, len(p))
            model(torch.tensor([p]), past_key_values=cache)
            rows.insert(cache)
            # Reference: the same sequence decoded alone with the ordinary cache, two steps.
            full = model(torch.tensor([p + [7, 8]])).logits[0, -2:]
            refs.append(full)
        got1 = model(torch.tensor([[7]] * 3), past_key_values=rows).logits[:, -1]
        got2 = model(torch.tensor([[8]] * 3), past_key_values=rows).logits[:, -1]
    for i in range(3):
        torch.testing.assert_close(got1[i], refs[i][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got2[i], refs[i][1], atol=1e-5, rtol=1e-5)
    # Removing a middle row moves the last one into its place; decoding continues correctly.
    assert rows.remove(0) == 2
    assert rows.rows == 2 and rows.lengths[:2].tolist() == [4, 13]


def test_row_cache_takes_rows_of_a_left_padded_batched_prefill() -> None:
    # Dynamic NTK on, with prompts on both sides of seq_length: each row must keep its own alpha.
    torch.manual_seed(0)
    model = QWenLMHeadModel(preset_config("tiny", seq_length=8, use_dynamic_ntk=True)).eval()
    model.init_weights(seed=1)
    prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (13, 5, 9)]
    longest = max(map(len, prompts))
    ids = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros(3, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = True
    rows = RowKVCache(model, max_rows=4, capacity=4)
    with torch.no_grad():
        batch = model.new_cache(3, longest)
        first = model(ids, attention_mask=mask, past_key_values=batch).logits[:, -1]
        for i in (2, 0, 1):  # any order
            rows.insert(batch, i)
        got = model(torch.tensor([[7], [7], [7]]), past_key_values=rows).logits[:, -1]
        for slot, i in enumerate((2, 0, 1)):
            single = model.new_cache(1, len(prompts[i]) + 1)
            ref_first = model(torch.tensor([prompts[i]]), past_key_values=single).logits[0, -1]
            ref = model(torch.tensor([[7]]), past_key_values=single).logits[0, -1]
            torch.testing.assert_close(first[i], ref_first, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[slot], ref, atol=1e-5, rtol=1e-5)
            assert rows.alphas[slot] == single.ntk_alpha[0]
    assert rows.alphas[:3] != [1.0, 1.0, 1.0]  # the 13- and 9-token prompts exceed seq_length 8
