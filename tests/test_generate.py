"""generate / generate_step / stream_generate / streamers / GenerationConfig.

Real tiny models check the numerics (cached == naive uncached loop, batched == single rows, the
official stop-word processor); a scripted model that forces a token sequence makes the text-level
behaviour (stop strings, UTF-8 splits, streamer protocol) deterministic.
"""

from __future__ import annotations

import json
import os
import queue
import threading

import pytest
import torch
from torch import nn

from qwen.config import preset_config
from scripted import Scripted
from qwen.generate import (
    QWEN_7B_BASE,
    QWEN_7B_CHAT,
    QWEN_14B_CHAT,
    GenerationConfig,
    StreamingDetokenizer,
    TextIteratorStreamer,
    TextStreamer,
    generate,
    generate_step,
    stream_generate,
)
from qwen.model import QWenLMHeadModel
from qwen.sampling import SamplingParams
from qwen.tokenizer import QWenTokenizer

IM_START, IM_END, EOD = 151644, 151645, 151643


@pytest.fixture(scope="module")
def small() -> QWenLMHeadModel:
    torch.manual_seed(0)
    model = QWenLMHeadModel(preset_config("tiny-vocab"))
    model.init_weights(seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer()


def prompts(lengths: list[int], seed: int = 0, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(map(len, rows))
    ids = torch.tensor([[pad] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.no_grad()
def naive_greedy(model: nn.Module, ids: list[int], n: int) -> list[int]:
    """Full uncached forward over the whole sequence at every step, argmax."""
    seq = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq


@torch.no_grad()
def official_loop(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int, eos: int, pad: int,
                  stops: list[list[int]]) -> torch.Tensor:
    """HF greedy search + the official StopWordsLogitsProcessor (eos logit := 2**15), uncached."""
    stops = [s for s in stops if s != [eos]]
    seq, mask = ids.clone(), mask.clone()
    unfinished = torch.ones(ids.shape[0], dtype=torch.long)
    for _ in range(n):
        logits = model(seq, attention_mask=mask, use_cache=False).logits[:, -1].float()
        for b in range(seq.shape[0]):
            row = seq[b].tolist()
            if any(row[len(row) - len(s):] == s for s in stops):
                logits[b, eos] = 32768.0
        nxt = logits.argmax(-1) * unfinished + pad * (1 - unfinished)
        seq = torch.cat([seq, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        unfinished = unfinished * (nxt != eos).long()
        if not unfinished.any():
            break
    return seq


# ------------------------------------------------------------------ a model that follows a script
def pieces(tok: QWenTokenizer, *texts: str) -> list[int]:
    return [i for t in texts for i in tok.encode(t, allowed_special=set())]


def new_text(records) -> str:  # type: ignore[no-untyped-def]
    return "".join(r.text for r in records)


# ------------------------------------------------------------------ numerics on a real tiny model
def test_greedy_equals_naive_uncached_loop(small: QWenLMHeadModel) -> None:
    for ids in prompts([1, 6, 13], seed=1):
        out = generate(small, torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert out[0].tolist() == naive_greedy(small, ids, 12)


def test_max_new_tokens_and_model_method(small: QWenLMHeadModel) -> None:
    ids = torch.tensor(prompts([5]))
    for n in (0, 1, 7):
        out = generate(small, ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
        assert out.shape == (1, 5 + n) and torch.equal(out[:, :5], ids)
    assert torch.equal(small.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None),
                       generate(small, ids, max_new_tokens=4, do_sample=False, eos_token_id=None))
    # max_length (prompt + new) is honoured when max_new_tokens is not given
    assert generate(small, ids, max_length=8, do_sample=False, eos_token_id=None).shape == (1, 8)


def test_model_generation_config_is_the_default(small: QWenLMHeadModel) -> None:
    ids = torch.tensor(prompts([4]))
    small.generation_config = GenerationConfig(max_new_tokens=3, eos_token_id=None)
    try:
        assert generate(small, ids).shape == (1, 7)
        assert generate(small, ids, max_new_tokens=5).shape == (1, 9)  # arguments win
    finally:
        small.generation_config = None


def test_batched_left_padded_rows_equal_single_rows(small: QWenLMHeadModel) -> None:
    rows = prompts([3, 9, 5, 1], seed=2)
    singles = [generate(small, torch.tensor([r]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                        repetition_penalty=1.3)[0, len(r):].tolist() for r in rows]
    # pad with the id a padded row generates first: were pads counted by the repetition penalty,
    # that row's output would change
    pad = singles[0][0]
    ids, mask = left_pad(rows, pad)
    out = generate(small, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                   pad_token_id=pad, repetition_penalty=1.3)
    assert [out[i, ids.shape[1]:].tolist() for i in range(len(rows))] == singles


def test_attention_mask_inferred_from_pad_id(small: QWenLMHeadModel) -> None:
    rows = prompts([2, 6], seed=3)
    ids, mask = left_pad(rows, pad=0)
    explicit = generate(small, ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=500,
                        pad_token_id=0)
    inferred = generate(small, ids, max_new_tokens=5, do_sample=False, eos_token_id=500, pad_token_id=0)
    assert torch.equal(explicit, inferred)


def test_right_padding_is_rejected(small: QWenLMHeadModel) -> None:
    ids = torch.tensor([[5, 6, 0], [5, 6, 7]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="left padding"):
        generate(small, ids, attention_mask=mask, max_new_tokens=2)


def test_eos_ends_a_row_and_pads_it(small: QWenLMHeadModel) -> None:
    rows = prompts([4, 7], seed=4)
    ids, mask = left_pad(rows, pad=0)
    free = generate(small, ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    gen = free[:, ids.shape[1]:].tolist()
    eos, pad = gen[0][2], 3
    expected_rows = []
    for g in gen:
        k = g.index(eos) + 1 if eos in g else len(g)
        expected_rows.append(g[:k])
    width = max(map(len, expected_rows))
    out = generate(small, ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                   pad_token_id=pad)
    assert out.shape[1] == ids.shape[1] + width
    for i, exp in enumerate(expected_rows):
        assert out[i, ids.shape[1]:].tolist() == exp + [pad] * (width - len(exp))


def test_stop_words_match_official_processor(small: QWenLMHeadModel) -> None:
    rows = prompts([5, 8, 3], seed=5)
    ids, mask = left_pad(rows, pad=0)
    free = generate(small, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    gen = free[:, ids.shape[1]:].tolist()
    eos, pad = 511, 7
    stops = [[gen[0][2]], gen[1][3:5], [eos]]  # single id, a 2-id sequence, and a dropped [eos]
    ours = generate(small, ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                    pad_token_id=pad, stop_words_ids=stops)
    ref = official_loop(small, ids, mask, 10, eos, pad, stops)
    assert torch.equal(ours, ref)
    assert ours[0, ids.shape[1]:ids.shape[1] + 4].tolist() == gen[0][:3] + [eos]


def test_stop_words_from_generation_config(small: QWenLMHeadModel) -> None:
    ids = torch.tensor(prompts([4], seed=6))
    free = generate(small, ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, 4:].tolist()
    cfg = GenerationConfig(do_sample=False, eos_token_id=500, max_new_tokens=6, stop_words_ids=[[free[1]]])
    out = generate(small, ids, generation_config=cfg)
    assert out[0, 4:].tolist() == free[:2] + [500]


def test_seeded_sampling(small: QWenLMHeadModel) -> None:
    ids = torch.tensor(prompts([3]))
    kw = dict(max_new_tokens=12, do_sample=True, top_k=0, top_p=1.0, eos_token_id=None)
    a = generate(small, ids, seed=11, **kw)
    assert torch.equal(a, generate(small, ids, seed=11, **kw))
    assert not torch.equal(a, generate(small, ids, seed=12, **kw))
    torch.manual_seed(5)
    b = generate(small, ids, **kw)
    torch.manual_seed(5)
    assert torch.equal(b, generate(small, ids, **kw))
    # temperature 0 is greedy
    greedy = generate(small, ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(generate(small, ids, max_new_tokens=6, do_sample=True, temperature=0.0, eos_token_id=None),
                       greedy)


def test_generate_step_reuses_a_cache_prefix(small: QWenLMHeadModel) -> None:
    ids = torch.tensor(prompts([12], seed=7))
    full = generate(small, ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    cache = small.new_cache(1, 40)
    small(ids[:, :8], past_key_values=cache)  # the first 8 prompt tokens are already cached
    steps = list(generate_step(small, ids, max_new_tokens=6, params=SamplingParams(), cache=cache))
    assert [int(s.tokens[0]) for s in steps] == full[0, 12:].tolist()
    assert steps[-1].finish_reasons == ["length"] and bool(steps[-1].finished[0])


def test_logits_processor_and_return_dict(small: QWenLMHeadModel) -> None:
    ids = torch.tensor(prompts([4]))

    def only_42(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        assert input_ids.shape[0] == 1
        out = torch.full_like(scores, float("-inf"))
        out[:, 42] = 0
        return out

    res = generate(small, ids, max_new_tokens=3, do_sample=True, seed=0, logits_processor=[only_42],
                   eos_token_id=None, return_dict_in_generate=True)
    assert res.sequences[0, 4:].tolist() == [42, 42, 42] and res.finish_reasons == ["length"]
    with pytest.raises(NotImplementedError):
        generate(small, ids, max_new_tokens=2, num_beams=4)


# ------------------------------------------------------------------ scripted model: stop words
def test_stop_word_appends_eos_without_a_forward_pass() -> None:
    model = Scripted([11, 12, IM_END, 13, 14])
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=10, stop_words_ids=[[IM_END], [IM_START]],
                   eos_token_id=EOD)
    assert out[0, 3:].tolist() == [11, 12, IM_END, EOD]
    assert model.forward_calls == 3  # prefill + 2 decode steps; the official needs a 4th for the eos


def test_stop_word_on_the_last_budget_step_gets_no_eos() -> None:
    out = generate(Scripted([11, 12, IM_END, 13]), torch.tensor([[1]]), max_new_tokens=3,
                   stop_words_ids=[[IM_END]], eos_token_id=EOD)
    assert out[0, 1:].tolist() == [11, 12, IM_END]


def test_multi_token_stop_word_and_redundant_eos_entry() -> None:
    out = generate(Scripted([11, 20, 21, 12]), torch.tensor([[1]]), max_new_tokens=10,
                   stop_words_ids=[[20, 21], [EOD]], eos_token_id=EOD)
    assert out[0, 1:].tolist() == [11, 20, 21, EOD]
    out = generate(Scripted([11, EOD, 12]), torch.tensor([[1]]), max_new_tokens=10, stop_words_ids=[[EOD]],
                   eos_token_id=EOD)
    assert out[0, 1:].tolist() == [11, EOD]


def test_streamer_receives_prompt_then_exactly_the_new_tokens() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.puts: list[list[int]] = []
            self.ended = 0

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.reshape(-1).tolist())

        def end(self) -> None:
            self.ended += 1

    rec = Recorder()
    out = generate(Scripted([11, 12, IM_END]), torch.tensor([[1, 2]]), max_new_tokens=10, streamer=rec,
                   stop_words_ids=[[IM_END]], eos_token_id=EOD)
    assert rec.puts[0] == [1, 2]
    assert sum(rec.puts[1:], []) == out[0, 2:].tolist() == [11, 12, IM_END, EOD]
    assert all(len(p) == 1 for p in rec.puts[1:]) and rec.ended == 1


def test_stop_strings_in_generate(tok: QWenTokenizer) -> None:
    script = pieces(tok, "Hello", " wor", "ld", " again", " and", " again")
    out = generate(Scripted(script), torch.tensor([[1]]), max_new_tokens=20, stop_strings=["world"], tokenizer=tok,
                   eos_token_id=EOD)
    assert tok.decode(out[0, 1:]) == "Hello world"
    with pytest.raises(ValueError, match="tokenizer"):
        generate(Scripted(script), torch.tensor([[1]]), max_new_tokens=3, stop_strings=["x"])


# ------------------------------------------------------------------ stream_generate
def test_stream_generate_holds_back_stop_strings(tok: QWenTokenizer) -> None:
    script = pieces(tok, "Hello", " world", " Obs", "erv", "ation", ":", " tool") + [EOD]
    records = list(stream_generate(Scripted(script), tok, [1, 2], stop_strings=["Observation:"], max_new_tokens=50))
    assert new_text(records) == "Hello world "
    assert all("O" not in r.text for r in records)
    final = records[-1]
    assert final.finish_reason == "stop" and final.stop_string == "Observation:"
    assert all(r.finish_reason is None for r in records[:-1])
    assert final.generation_tokens == len(pieces(tok, "Hello", " world", " Obs", "erv", "ation", ":"))


def test_stream_generate_releases_a_false_start(tok: QWenTokenizer) -> None:
    script = pieces(tok, "Hello", " Obs", "cure", " end") + [EOD]
    records = list(stream_generate(Scripted(script), tok, [1], stop_strings=["Observation:"], max_new_tokens=50))
    assert new_text(records) == "Hello Obscure end"
    texts = [r.text for r in records]
    obs_step = len(pieces(tok, "Hello", " Obs")) - 1
    assert "Obs" not in "".join(texts[: obs_step + 1])  # held while it could still become the stop string
    assert records[-1].finish_reason == "stop" and records[-1].stop_string is None
    assert records[-1].token == EOD and records[-1].text == ""  # eos text is never emitted


def test_stream_generate_never_splits_utf8(tok: QWenTokenizer) -> None:
    assert tok.decode([51461]) == " \ufffd" and tok.decode([51461, 117]) == " 根"
    script = [51461, 117, 51461, 117] + pieces(tok, "好") + [IM_END]
    records = list(stream_generate(Scripted(script), tok, [1], max_new_tokens=50, stop_words_ids=[[IM_END]]))
    assert all("\ufffd" not in r.text for r in records)
    assert [r.text for r in records[:4]] == ["", " 根", "", " 根"]
    assert new_text(records) == " 根 根好"
    assert records[-1].finish_reason == "stop" and records[-1].token == IM_END


def test_stream_generate_length_and_stats(tok: QWenTokenizer) -> None:
    script = pieces(tok, "one two three four five six")
    records = list(stream_generate(Scripted(script), tok, "a prompt", max_new_tokens=4))
    assert len(records) == 4 and records[-1].finish_reason == "length"
    assert [r.generation_tokens for r in records] == [1, 2, 3, 4]
    assert records[-1].prompt_tokens == len(tok.encode("a prompt")) and records[-1].cached_tokens == 0
    assert records[-1].prompt_tps > 0 and records[-1].generation_tps > 0
    assert new_text(records) == tok.decode(script[:4])
    empty = list(stream_generate(Scripted(script), tok, [1], max_new_tokens=0))
    assert len(empty) == 1 and empty[0].finish_reason == "length" and empty[0].token is None
    with pytest.raises(TypeError):
        list(stream_generate(Scripted(script), tok, [1], not_a_setting=1))


def test_stream_generate_never_samples_undecodable_ids(tok: QWenTokenizer) -> None:
    # A random model can prefer the embedding's padding rows (ids >= 151851); they are banned.
    model = Scripted([151900, 151900])
    records = list(stream_generate(model, tok, [1], max_new_tokens=2))
    assert all(r.token < len(tok) for r in records)


def test_detokenizer_commits_only_at_char_boundaries(tok: QWenTokenizer) -> None:
    det = StreamingDetokenizer(tok)
    assert det.add(51461) == "" and det.text == ""
    assert det.add(117) == " 根" and det.text == " 根"
    assert det.add(51461) == ""
    assert det.finalize() == " \ufffd"  # an incomplete character at the very end is flushed as U+FFFD
    assert det.text == tok.decode([51461, 117, 51461])


# ------------------------------------------------------------------ streamers
def test_text_streamer_prints_safe_deltas(tok: QWenTokenizer, capsys: pytest.CaptureFixture) -> None:
    script = [51461, 117] + pieces(tok, " ok") + [IM_END]
    streamer = TextStreamer(tok, skip_prompt=True)
    generate(Scripted(script), torch.tensor([tok.encode("prompt")]), max_new_tokens=10, streamer=streamer,
             stop_words_ids=[[IM_END]], eos_token_id=EOD)
    assert capsys.readouterr().out == " 根 ok\n"
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=False)
    generate(Scripted(script), torch.tensor([tok.encode("prompt")]), max_new_tokens=3, streamer=streamer)
    assert capsys.readouterr().out == "prompt 根 ok\n"
    with pytest.raises(ValueError, match="batch size 1"):
        TextStreamer(tok).put(torch.zeros(2, 3, dtype=torch.long))


def test_text_iterator_streamer_from_a_thread(tok: QWenTokenizer) -> None:
    script = pieces(tok, "你好", "，", "世界") + [IM_END]
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)
    kwargs = dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=10, streamer=streamer, stop_words_ids=[[IM_END]],
                  eos_token_id=EOD)
    thread = threading.Thread(target=generate, args=(Scripted(script),), kwargs=kwargs)
    thread.start()
    deltas = list(streamer)
    thread.join()
    assert "".join(deltas) == "你好，世界" and all(deltas)
    idle = TextIteratorStreamer(tok, timeout=0.05)
    with pytest.raises(queue.Empty):
        next(idle)


# ------------------------------------------------------------------ GenerationConfig
def test_generation_config_defaults_and_presets() -> None:
    cfg = GenerationConfig()
    assert (cfg.max_new_tokens, cfg.top_k, cfg.top_p, cfg.eos_token_id, cfg.chat_format, cfg.max_window_size) == \
        (512, 0, 1.0, 151643, "chatml", 6144)
    chat7 = GenerationConfig.from_preset("qwen-7b-chat")
    assert (chat7.max_window_size, chat7.top_p, chat7.repetition_penalty, chat7.do_sample) == (24000, 0.8, 1.1, True)
    assert chat7.extra == {"transformers_version": "4.31.0"}
    assert GenerationConfig.from_dict(QWEN_14B_CHAT).max_window_size == 6144
    base = GenerationConfig.from_dict(QWEN_7B_BASE)
    assert base.chat_format == "raw" and base.stop_words_ids == [[151643]]
    assert QWEN_7B_CHAT["top_p"] == 0.8  # from_preset did not alias the module constant
    with pytest.raises(ValueError):
        GenerationConfig.from_preset("gpt-2")


def test_generation_config_file_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "generation_config.json").write_text(json.dumps({**QWEN_7B_CHAT, "num_beams": 1}))
    cfg = GenerationConfig.from_pretrained(tmp_path)
    assert cfg == GenerationConfig.from_pretrained(tmp_path / "generation_config.json")
    assert cfg.extra == {"transformers_version": "4.31.0", "num_beams": 1}
    out = tmp_path / "out"
    path = cfg.save_pretrained(out)
    assert os.listdir(out) == ["generation_config.json"] and path == str(out / "generation_config.json")
    saved = json.loads((out / "generation_config.json").read_text())
    assert {k: saved[k] for k in QWEN_7B_CHAT} == QWEN_7B_CHAT
    assert GenerationConfig.from_pretrained(out) == cfg
    with pytest.raises(FileNotFoundError, match="generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path / "missing")


def test_generation_config_update_and_copy() -> None:
    cfg = GenerationConfig()
    unknown = cfg.update(top_p=0.5, temperature=0.7, foo=1, bar=None)
    assert unknown == {"foo": 1, "bar": None} and (cfg.top_p, cfg.temperature) == (0.5, 0.7)
    with pytest.raises(ValueError):
        cfg.update(top_p=2.0)
    assert cfg.top_p == 0.5  # a rejected update leaves the config unchanged
    clone = cfg.copy()
    clone.update(stop_words_ids=[[1]])
    assert cfg.stop_words_ids is None
    assert "presence_penalty" not in cfg.to_dict() and "pad_token_id" not in cfg.to_dict()


def test_readme_batch_recipe_with_the_tokenizer() -> None:
    model = QWenLMHeadModel(preset_config("tiny"))
    model.init_weights(seed=0)
    model.eval()
    tok = QWenTokenizer(pad_token="<|extra_0|>", padding_side="left")
    texts = ["Hello", "A much longer prompt about cats and dogs", "你好，世界"]
    batch = tok(texts, padding=True, return_tensors="pt")  # includes token_type_ids: ignored
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    t = batch["input_ids"].shape[1]
    for i, text in enumerate(texts):
        single = generate(model, torch.tensor([tok.encode(text)]), max_new_tokens=6, do_sample=False)
        assert out[i, t:].tolist() == single[0, -6:].tolist()
