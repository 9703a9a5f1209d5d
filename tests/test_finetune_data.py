"""Fine-tuning data: file detection, validation errors, label masks (ours vs official), packing, blocks, collate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen.chat_template import DEFAULT_SYSTEM, make_context, render_messages
from qwen.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    Record,
    collate,
    encode_chat,
    encode_text,
    load_dataset,
    read_records,
    tokenize_records,
)
from qwen.tokenizer import QWenTokenizer

IM_START, IM_END, EOD = 151644, 151645, 151643
I = IGNORE_INDEX  # noqa: E741


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer()


def chat(*turns: tuple[str, str], source: str = "t.jsonl:1") -> Record:
    return Record(source, "chat", conversations=[{"role": r, "content": c} for r, c in turns])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def sample(*pairs: str, key: str = "conversations") -> dict:
    """sample("user", "hi", "assistant", "hello") in the official {"from", "value"} format."""
    return {"id": "x", key: [{"from": r, "value": v} for r, v in zip(pairs[::2], pairs[1::2])]}


# ---------------------------------------------------------------------------------------------------------
# Label masks, built by hand from tokenizer pieces

SYSTEM = "Be brief."
USER1 = "Hi <|im_end|> there"  # special-token text in the data
ANSWER1 = "Hello!"
USER2 = "2+2?"
ANSWER2 = "4"
MULTI_TURN = (("system", SYSTEM), ("user", USER1), ("assistant", ANSWER1), ("user", USER2), ("assistant", ANSWER2))


def test_assistant_mask_by_hand(tok: QWenTokenizer) -> None:
    def S(x: str) -> list[int]:
        return tok.encode(x, allowed_special=set())

    nl = tok.encode("\n")
    ids: list[int] = []
    labels: list[int] = []

    def add(piece: list[int], supervised: bool) -> None:
        ids.extend(piece)
        labels.extend(piece if supervised else [I] * len(piece))

    add([IM_START] + S("system") + nl + S(SYSTEM) + [IM_END], False)  # the sample's own system prompt
    add(nl + [IM_START] + S("user") + nl + S(USER1) + [IM_END], False)
    add(nl + [IM_START] + S("assistant") + nl, False)
    add(S(ANSWER1) + [IM_END], True)
    add(nl + [IM_START] + S("user") + nl + S(USER2) + [IM_END], False)
    add(nl + [IM_START] + S("assistant") + nl, False)
    add(S(ANSWER2) + [IM_END], True)

    ex = encode_chat(tok, chat(*MULTI_TURN), label_mask="assistant", system="ignored: the sample has one")
    assert ex.input_ids == ids
    assert ex.labels == labels
    assert ex.source == "t.jsonl:1"
    assert IM_END not in S(USER1)  # "<|im_end|>" in user text stays text
    assert ex.input_ids.count(IM_END) == 5
    assert tok.decode(ex.input_ids).count(SYSTEM) == 1


def test_official_mask_by_hand(tok: QWenTokenizer) -> None:
    def A(x: str) -> list[int]:  # the official tokenizer(x).input_ids
        return tok(x).input_ids

    nl = A("\n")
    ids: list[int] = []
    labels: list[int] = []

    def add(piece: list[int], label: list[int]) -> None:
        ids.extend(piece)
        labels.extend(label)

    def turn(role: str, content: str) -> None:
        header = A(role) + nl
        body = A(content)
        add([IM_START] + header + body + [IM_END] + nl,
            [IM_START] + [I] * len(header) + (body if role == "assistant" else [I] * len(body)) + [IM_END] + nl)

    turn("system", DEFAULT_SYSTEM)  # the sample's "Be brief." is ignored, as in finetune.py
    turn("user", USER1)
    turn("assistant", ANSWER1)
    turn("user", USER2)
    turn("assistant", ANSWER2)

    ex = encode_chat(tok, chat(*MULTI_TURN), label_mask="official")
    assert ex.input_ids == ids
    assert ex.labels == labels
    assert IM_END in A(USER1)  # special text in data is parsed, as officially
    assert ex.input_ids.count(IM_END) == 6
    assert SYSTEM not in tok.decode(ex.input_ids) and DEFAULT_SYSTEM in tok.decode(ex.input_ids)
    # The structural tokens are supervised in every turn; no padding is added here.
    assert ex.labels.count(IM_START) == ex.labels.count(IM_END) == 5
    assert ex.labels[-2:] == [IM_END] + nl


def test_official_drops_a_first_turn_not_from_user(tok: QWenTokenizer) -> None:
    rec = chat(("assistant", "Welcome!"), ("user", "hi"), ("assistant", "hello"))
    ex = encode_chat(tok, rec, label_mask="official")
    same = encode_chat(tok, chat(("user", "hi"), ("assistant", "hello")), label_mask="official")
    assert ex.input_ids == same.input_ids and ex.labels == same.labels
    ours = encode_chat(tok, rec)
    assert "Welcome!" in tok.decode(ours.input_ids)


def test_modes_agree_on_ids_without_special_text(tok: QWenTokenizer) -> None:
    rec = chat(("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"), ("assistant", "6."))
    ours = encode_chat(tok, rec)
    official = encode_chat(tok, rec, label_mask="official")
    assert official.input_ids == ours.input_ids + tok.encode("\n")  # only the trailing newline differs
    # The official mode supervises a superset of ours (plus <|im_start|>/<|im_end|>/"\n" of every turn).
    ours_kept = {i for i, t in enumerate(ours.labels) if t != I}
    official_kept = {i for i, t in enumerate(official.labels) if t != I}
    assert ours_kept < official_kept


def test_system_argument_is_the_default_prompt(tok: QWenTokenizer) -> None:
    rec = chat(("user", "hi"), ("assistant", "hello"))
    assert "Custom." in tok.decode(encode_chat(tok, rec, system="Custom.").input_ids)
    assert DEFAULT_SYSTEM in tok.decode(encode_chat(tok, rec).input_ids)
    assert "Custom." in tok.decode(encode_chat(tok, rec, label_mask="official", system="Custom.").input_ids)
    with pytest.raises(ValueError, match="label_mask"):
        encode_chat(tok, rec, label_mask="all")


# ---------------------------------------------------------------------------------------------------------
# Train / inference template consistency


def test_generation_prompt_matches_make_context(tok: QWenTokenizer) -> None:
    ids, _ = render_messages(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER1}],
                             add_generation_prompt=True)
    assert ids == make_context(tok, USER1, system=SYSTEM)[1]


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_training_prefix_is_the_inference_prompt(tok: QWenTokenizer, system: str | None) -> None:
    turns = [("user", "first <|endoftext|> question"), ("assistant", "first answer"), ("user", "second\n\nquestion"),
             ("assistant", "second answer")]
    rec = chat(*([("system", system)] if system else []), *turns)
    ex = encode_chat(tok, rec)
    _, context = make_context(tok, turns[2][1], history=[(turns[0][1], turns[1][1])], system=system or DEFAULT_SYSTEM)
    n = len(context)
    assert ex.input_ids[:n] == context
    # Inside the prompt only the first answer is learned; after it, exactly the reply and <|im_end|>.
    assert ex.input_ids[n:] == tok.encode("second answer") + [IM_END]
    assert ex.labels[n:] == ex.input_ids[n:]
    assert sum(t != I for t in ex.labels[:n]) == len(tok.encode("first answer")) + 1


# ---------------------------------------------------------------------------------------------------------
# Formats and detection


def test_json_list_jsonl_and_text_detection(tmp_path: Path, tok: QWenTokenizer) -> None:
    samples = [sample("user", "hi", "assistant", "hello"), sample("user", "q", "assistant", "a")]
    (tmp_path / "list.json").write_text(json.dumps(samples, indent=2))
    (tmp_path / "noext").write_text(json.dumps(samples))
    write_jsonl(tmp_path / "lines.jsonl", samples)
    write_jsonl(tmp_path / "lines_named.json", samples)  # JSONL saved as .json
    as_list = read_records(tmp_path / "list.json")
    assert [r.source for r in as_list] == [f"{tmp_path / 'list.json'}[0]", f"{tmp_path / 'list.json'}[1]"]
    assert [r.source for r in read_records(tmp_path / "noext")][1].endswith("noext[1]")
    lines = read_records(tmp_path / "lines.jsonl")
    assert [r.source for r in lines] == [f"{tmp_path / 'lines.jsonl'}:1", f"{tmp_path / 'lines.jsonl'}:2"]
    assert read_records(tmp_path / "lines_named.json")[1].source.endswith("lines_named.json:2")
    for records in (as_list, lines):
        assert [r.kind for r in records] == ["chat", "chat"]
        assert records[0].conversations == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

    (tmp_path / "book.txt").write_text('{"not": "json"}\nsecond line\n')
    (book,) = read_records(tmp_path / "book.txt")
    assert (book.kind, book.text, book.source) == ("text", '{"not": "json"}\nsecond line', f"{tmp_path / 'book.txt'}:1")
    (tmp_path / "prose").write_text("Once upon a time.\n")
    assert read_records(tmp_path / "prose")[0].text == "Once upon a time."


def test_text_documents_split_on_endoftext_lines(tmp_path: Path, tok: QWenTokenizer) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("doc one\nstill one <|endoftext|> inline\n<|endoftext|>\n\ndoc two\n  <|endoftext|>  \n"
                    "<|endoftext|>\n")
    docs = read_records(path)
    assert [d.text for d in docs] == ["doc one\nstill one <|endoftext|> inline", "doc two"]
    assert [d.source for d in docs] == [f"{path}:1", f"{path}:5"]
    ids = encode_text(tok, docs[0])
    assert ids == tok.encode(docs[0].text, allowed_special=set()) + [EOD]
    assert ids.count(EOD) == 1  # the inline marker is text


def test_aliases_role_content_and_top_level_system(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mix.jsonl", [
        sample("human", "hi", "gpt", "hello"),
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"system": "Top", "conversations": [{"role": "User", "content": "u"}, {"role": "ASSISTANT", "content": "a"}]},
        {"text": "a pretraining document"},
        "",
        "   ",
    ])
    recs = read_records(path)
    assert recs[0].conversations == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert recs[1].conversations[0] == {"role": "system", "content": "S"}
    assert recs[2].conversations == [{"role": "system", "content": "Top"}, {"role": "user", "content": "u"},
                                     {"role": "assistant", "content": "a"}]
    assert (recs[3].kind, recs[3].text, recs[3].source) == ("text", "a pretraining document", f"{path}:4")
    assert len(recs) == 4  # blank lines skipped


# ---------------------------------------------------------------------------------------------------------
# Validation


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [
        sample("user", "fine", "assistant", "fine"),                                     # 1
        '{"conversations": [',                                                           # 2
        {"conversations": []},                                                           # 3
        sample("bot", "x", "assistant", "y"),                                            # 4
        {"conversations": [{"from": "user", "value": 3}, {"from": "assistant", "value": "a"}]},  # 5
        sample("user", "only a question"),                                               # 6
        sample("user", "q", "system", "late", "assistant", "a"),                         # 7
        {"id": 8},                                                                       # 8
        [1, 2],                                                                          # 9
        {"text": 5},                                                                     # 10
        {"text": "t", "conversations": []},                                              # 11
        {"conversations": [{"value": "no role"}, {"from": "assistant"}]},                # 12
        {"system": "S", "conversations": sample("system", "T", "user", "u", "assistant", "a")["conversations"]},  # 13
        {"conversations": "not a list"},                                                 # 14
        {"text": "  "},                                                                  # 15
    ])
    with pytest.raises(DataError) as info:
        read_records(path)
    err = info.value
    expected = {
        2: "invalid JSON", 3: "'conversations' is empty", 4: "unknown role 'bot'", 5: "'value' must be a string",
        6: "no assistant turn", 7: "system turn must be the first", 8: "no 'conversations'", 9: "expected a JSON object",
        10: "'text' must be a string", 11: "both 'text' and 'conversations'", 12: "missing 'from'",
        13: "both a top-level 'system' and a system turn", 14: "must be a list of turns", 15: "'text' is empty",
    }
    for line, what in expected.items():
        assert any(p.startswith(f"{path}:{line}:") and what in p for p in err.problems), (line, what, err.problems)
    assert f"{path}:12: conversations[1]: missing 'value'" in " | ".join(err.problems)
    assert not any(p.startswith(f"{path}:1:") for p in err.problems)
    assert len(err.problems) == 15
    assert str(err).startswith("15 problems in the training data:")
    assert f"{path}:4: conversations[0]: unknown role 'bot'" in str(err)
    assert isinstance(err, ValueError)


def test_json_list_errors_name_the_sample_index(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([sample("user", "q", "assistant", "a"), sample("user", "q"), "oops"]))
    with pytest.raises(DataError) as info:
        read_records(path)
    assert info.value.problems == [f"{path}[1]: no assistant turn, so nothing to learn from",
                                   f"{path}[2]: expected a JSON object, got a string"]

    path.write_text('[\n  {"conversations": []},\n  {oops}\n]')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        read_records(path)
    path.write_text('{"conversations": [')  # ".json" + "{" → read as JSONL
    with pytest.raises(DataError, match=rf"{path}:1: invalid JSON"):
        read_records(path)
    path.write_text("just words")  # a .json file that is not JSON is an error, not prose
    with pytest.raises(DataError, match=rf"{path}:1: invalid JSON"):
        read_records(path)
    path.write_text('["a", 1]')
    with pytest.raises(DataError, match=r"\[0\]: expected a JSON object, got a string"):
        read_records(path)
    path.write_text(json.dumps(sample("user", "q", "assistant", "a"), indent=2))  # pretty-printed single sample
    with pytest.raises(DataError, match="one JSON object spanning several lines"):
        read_records(path)


@pytest.mark.parametrize("content", ["", "  \n\n", "[]", "<|endoftext|>\n<|endoftext|>\n"])
def test_empty_files_are_errors(tmp_path: Path, content: str) -> None:
    path = tmp_path / ("empty.txt" if "endoftext" in content else "empty.json")
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path}: (empty file|no samples)"):
        read_records(path)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl: cannot read"):
        read_records(tmp_path / "nope.jsonl")
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8"):
        read_records(path)


def test_long_problem_lists_are_cut(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "many.jsonl", [{"id": i} for i in range(25)])
    with pytest.raises(DataError) as info:
        read_records(path)
    text = str(info.value)
    assert len(info.value.problems) == 25
    assert f"{path}:20:" in text and f"{path}:21:" not in text
    assert text.endswith("... and 5 more")


def test_load_dataset_aggregates_files(tmp_path: Path, tok: QWenTokenizer) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [sample("user", "q", "assistant", "a")])
    bad1 = write_jsonl(tmp_path / "bad1.jsonl", [sample("user", "q")])
    bad2 = tmp_path / "bad2.json"
    bad2.write_text("[{]")
    with pytest.raises(DataError) as info:
        load_dataset([good, bad1, bad2], tok, max_len=64)
    assert [p.split(":")[0].split("/")[-1] for p in info.value.problems] == ["bad1.jsonl", "bad2.json"]
    data = load_dataset(str(good), tok, max_len=64)
    assert len(data.examples) == 1 and data.num_records == 1
    with pytest.raises(ValueError, match="label_mask"):
        load_dataset(good, tok, max_len=64, label_mask="everything")


# ---------------------------------------------------------------------------------------------------------
# Tokenizing a dataset


def test_truncation_and_dropping_are_counted(tok: QWenTokenizer) -> None:
    prompt_len = len(encode_chat(tok, chat(("user", "q"), ("assistant", ""))).input_ids) - 1  # up to "assistant\n"
    records = [
        chat(("user", "q"), ("assistant", "short"), source="a:1"),
        chat(("user", "q"), ("assistant", "word " * 50), source="a:2"),          # cut, answer partly kept
        chat(("user", "long question " * 40), ("assistant", "a"), source="a:3"),  # cut inside the prompt: dropped
    ]
    max_len = prompt_len + 5
    data = tokenize_records(tok, records, max_len=max_len)
    assert [ex.source for ex in data.examples] == ["a:1", "a:2"]
    assert (data.num_records, data.num_truncated, data.num_dropped) == (3, 2, 1)
    assert all(len(ex.input_ids) <= max_len for ex in data.examples)
    assert len(data.examples[1].input_ids) == max_len
    assert data.examples[1].labels[-5:] == data.examples[1].input_ids[-5:]
    assert data.num_tokens == sum(len(ex.input_ids) for ex in data.examples)
    assert data.num_supervised_tokens == sum(t != I for ex in data.examples for t in ex.labels)
    assert data.num_supervised_tokens == len(tok.encode("short")) + 1 + 5
    share = round(100 * data.num_supervised_tokens / data.num_tokens)
    assert data.report() == (f"3 samples (2 truncated to --max-len {max_len}, 1 dropped: no supervised tokens left), "
                             f"{data.num_tokens:,} tokens, {share}% supervised")


def test_only_label_zero_left_counts_as_dropped(tok: QWenTokenizer) -> None:
    # Official mode supervises the very first <|im_start|>, which the shifted loss never uses.
    data_rec = [chat(("user", "q"), ("assistant", "a")), chat(("user", "q"), ("assistant", "b"))]
    with pytest.raises(DataError, match="no training rows left: all 2 samples were dropped"):
        tokenize_records(tok, data_rec, max_len=3, label_mask="official")


def test_packing_keeps_every_token_within_max_len(tok: QWenTokenizer) -> None:
    records = [chat(("user", f"question {i} " * (i % 4 + 1)), ("assistant", f"answer {i}"), source=f"p:{i}")
               for i in range(12)]
    plain = tokenize_records(tok, records, max_len=96)
    packed = tokenize_records(tok, records, max_len=96, packing=True)
    assert len(packed.examples) < len(plain.examples) == 12
    assert all(len(ex.input_ids) <= 96 for ex in packed.examples)
    assert [t for ex in packed.examples for t in ex.input_ids] == [t for ex in plain.examples for t in ex.input_ids]
    assert [t for ex in packed.examples for t in ex.labels] == [t for ex in plain.examples for t in ex.labels]
    assert (packed.num_tokens, packed.num_supervised_tokens) == (plain.num_tokens, plain.num_supervised_tokens)
    # Greedy: the next sample did not fit in the row before.
    lengths = [len(ex.input_ids) for ex in plain.examples]
    row_lengths = [len(ex.input_ids) for ex in packed.examples]
    k = 0
    for row_len in row_lengths[:-1]:
        total = 0
        while total + lengths[k] <= row_len:
            total += lengths[k]
            k += 1
        assert total == row_len and row_len + lengths[k] > 96
    assert packed.examples[0].source.startswith("p:0 (+")
    assert f"packed into {len(packed.examples)} rows" in packed.report()


def test_pretraining_blocks(tok: QWenTokenizer) -> None:
    docs = [Record(f"c.txt:{i}", "text", text=t) for i, t in enumerate(["The first document.", "第二个文档", "third"])]
    stream = [t for d in docs for t in encode_text(tok, d)]
    length = len(stream)
    assert stream.count(EOD) == 3

    data = tokenize_records(tok, docs, max_len=4)
    expected = [stream[i:i + 4] for i in range(0, length, 4) if len(stream[i:i + 4]) >= 2]
    assert [ex.input_ids for ex in data.examples] == expected
    assert all(ex.labels == ex.input_ids for ex in data.examples)
    assert (data.num_truncated, data.num_dropped, data.num_blocks, data.num_documents) == (0, 0, len(expected), 3)

    one_left = tokenize_records(tok, docs, max_len=length - 1)  # the 1-token remainder is dropped
    assert [ex.input_ids for ex in one_left.examples] == [stream[:-1]]
    two_left = tokenize_records(tok, docs, max_len=length - 2)  # a 2-token remainder is kept
    assert [ex.input_ids for ex in two_left.examples] == [stream[:-2], stream[-2:]]
    assert two_left.examples[1].source == "c.txt:2"  # the document its first token belongs to
    assert two_left.report() == f"3 documents in 2 blocks of {length - 2} tokens, {length:,} tokens, 100% supervised"


def test_mixed_chat_and_text(tmp_path: Path, tok: QWenTokenizer) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "plain words " * 40}, sample("user", "q", "assistant", "a"),
                                                  {"text": "more words"}])
    data = load_dataset(path, tok, max_len=32, progress=True)
    assert data.examples[0].source == f"{path}:2"  # chat rows first, then the blocks
    assert IM_START in data.examples[0].input_ids
    assert data.num_blocks == len(data.examples) - 1 >= 2
    assert (data.num_documents, data.num_records, data.num_truncated, data.num_dropped) == (2, 3, 0, 0)
    assert data.report().startswith(f"1 sample + 2 documents in {data.num_blocks} blocks of 32 tokens, ")


def test_tokenize_records_argument_checks(tok: QWenTokenizer) -> None:
    rec = [chat(("user", "q"), ("assistant", "a"))]
    with pytest.raises(ValueError, match="max_len"):
        tokenize_records(tok, rec, max_len=1)
    with pytest.raises(ValueError, match="label_mask"):
        tokenize_records(tok, rec, max_len=8, label_mask="none")
    with pytest.raises(DataError, match="no training samples"):
        tokenize_records(tok, [], max_len=8)


# ---------------------------------------------------------------------------------------------------------
# Collate


def test_collate_pads_right_and_masks() -> None:
    batch = collate([Example([1, 2, 3], [I, 2, 3], "a"), Example([4], [4], "b")], pad_id=EOD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, EOD, EOD]]
    assert batch["labels"].tolist() == [[I, 2, 3], [4, I, I]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.int64 and t.shape == (2, 3) for t in batch.values())

    wide = collate([Example([1, 2, 3], [1, 2, 3], "a")], pad_id=0, pad_to_multiple_of=8)
    assert wide["input_ids"].shape == (1, 8) and wide["attention_mask"].sum() == 3
    assert wide["labels"][0, 3:].eq(I).all()
    with pytest.raises(ValueError):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="labels"):
        Example([1, 2], [1], "bad")


def test_data_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(DataError(["a:1: x", "a:2: y"])))
    assert err.problems == ["a:1: x", "a:2: y"] and "2 problems" in str(err)
