"""Tests for qwen.tokenizer.

Ids are checked three ways: the spec's fixed vectors, an independent pure-Python BPE (regex split + lowest-rank
merge loop), and a tiktoken.Encoding built here straight from the vocabulary file, which hypothesis compares
against on random and real text. The rest covers decode errors, batching, persistence, extra vocab and the
chunking of long inputs.
"""

from __future__ import annotations

import base64
import functools
import json
import pickle
import random
import unicodedata

import numpy as np
import pytest
import regex
import tiktoken
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen import tokenizer as qt
from qwen.tokenizer import BatchEncoding, QwenTokenizer, QWenTokenizer, VocabFileError

# Written out again (not imported) so a typo in the module cannot hide behind itself.
PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]

PROPERTY_SETTINGS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Multilingual text for slicing into "real" samples.
PARAGRAPH = """\
The quick brown fox doesn't jump; it's 3.14159 times lazier than we'd THOUGHT. I'M sure you'LL agree — they've
said so since 1999, and it'd be odd otherwise.\tTabs\tand  double  spaces,   triple   spaces.
通义千问（Qwen）是阿里云研发的大语言模型，于2023年8月3日开源。你好，世界！我是一只猫，名字还没有。
日本語のテキストも少し：吾輩は猫である。名前はまだ無い。 한국어 문장도 있습니다: 안녕하세요, 세계!
Русский текст: Съешь же ещё этих мягких французских булок, да выпей чаю. Ελληνικά: Γειά σου Κόσμε.
العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก
Emoji: 👍🏽 👨‍👩‍👧‍👦 🇨🇳🇺🇸 😀😃😄 ✨ — café, naïve, Å, ﬁ ligature, ½ ², e\u0301 a\u0308 q\u0307.
def f(x: int) -> int:\r\n    return x ** 2  # comment with <|endoftext|> inside\r\n
\tif (a != b && c >= 0) { printf("%d\\n", a[i]); }
  \n\n   \u3000全角空格\u3000 and\u00a0no-break\u2009thin\u2028line sep 12,345,678.90 ¥100 €5 $3
"""


# ---------------------------------------------------------------------------------------------------------
# References built independently of qwen.tokenizer


@functools.lru_cache(maxsize=1)
def reference_ranks() -> dict[bytes, int]:
    ranks = {}
    for line in qt.bundled_vocab_path().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def reference_encoding() -> tiktoken.Encoding:
    specials = {s: 151643 + i for i, s in enumerate(SPECIALS)}
    return tiktoken.Encoding("qwen-reference", pat_str=PAT, mergeable_ranks=reference_ranks(), special_tokens=specials)


def ref_encode(text: str, allowed_special="all") -> list[int]:
    return reference_encoding().encode(unicodedata.normalize("NFC", text), allowed_special=allowed_special, disallowed_special=())


def python_bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm, spelled out: whole piece if known, else merge the lowest-rank adjacent pair."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):  # strict <: leftmost wins ties
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def python_encode(text: str) -> list[int]:
    ranks = reference_ranks()
    text = unicodedata.normalize("NFC", text)
    return [i for piece in regex.findall(PAT, text) for i in python_bpe(piece.encode("utf-8"), ranks)]


@functools.lru_cache(maxsize=1)
def shared_tokenizer() -> QWenTokenizer:
    return QWenTokenizer()


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return shared_tokenizer()


@pytest.fixture
def padded() -> QWenTokenizer:
    return QWenTokenizer(pad_token="<|extra_0|>", eos_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------------------
# Constants and vocabulary


def test_constants():
    assert qt.PAT_STR == PAT
    assert qt.SPECIAL_START_ID == 151643
    assert list(qt.SPECIAL_TOKENS) == SPECIALS and len(qt.SPECIAL_TOKENS) == 208
    assert (qt.ENDOFTEXT, qt.IMSTART, qt.IMEND) == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert qt.EXTRAS[0] == "<|extra_0|>" and qt.EXTRAS[-1] == "<|extra_204|>" and len(qt.EXTRAS) == 205
    assert qt.VOCAB_FILES_NAMES == {"vocab_file": "qwen.tiktoken"}
    assert QwenTokenizer is QWenTokenizer


def test_vocabulary_shape(tok):
    assert qt.bundled_vocab_path().is_file()
    ranks = tok.get_vocab()
    assert len(ranks) == 151643 and sorted(ranks.values()) == list(range(151643))
    assert ranks == reference_ranks()
    assert ranks[b"!"] == 0 and ranks[b"\n"] == 198 and ranks[b" "] == 220
    assert len(tok) == tok.vocab_size == 151851
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.special_tokens == {s: 151643 + i for i, s in enumerate(SPECIALS)}
    assert tok.all_special_ids == list(range(151643, 151851))
    assert tok.tokenizer.name == "Qwen" and tok.tokenizer.n_vocab == 151851
    assert tok.pad_token_id is None and tok.eos_token_id is None and tok.bos_token_id is None
    assert (tok.padding_side, tok.errors) == ("right", "replace")
    assert tok.decoder[151645] == "<|im_end|>" and tok.decoder[9707] == b"Hello"


# ---------------------------------------------------------------------------------------------------------
# Spec vectors (reference §12, environment §3)

ENCODE_VECTORS = [
    ("\n", [198]),
    ("system", [8948]),
    ("user", [872]),
    ("assistant", [77091]),
    ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
    ("Human:", [33975, 25]),
    ("你好", [108386]),
    ("12345", [16, 17, 18, 19, 20]),
    (" 2023年", [220, 17, 15, 17, 18, 7948]),
    ("Hello world!\n\n", [9707, 1879, 2219]),
    ("Hello world", [9707, 1879]),
    (" ", [220]),
    ("\n\n", [271]),
    ("你好，世界 hello 12345", [108386, 3837, 99489, 23811, 220, 16, 17, 18, 19, 20]),
    ('print("<|endoftext|>")', [1350, 445, 151643, 899]),
    (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n",
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 108386, 151645, 198,
         151644, 77091, 198],
    ),
    ("<|im_start|>user\n\nhello  <|im_end|>", [151644, 872, 271, 14990, 256, 151645]),
]


@pytest.mark.parametrize("text, ids", ENCODE_VECTORS)
def test_encode_vectors(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok(text)["input_ids"] == ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "text, tokens",
    [("Panda", [b"P", b"anda"]), (" Panda", [b" Panda"]), ("Pandas", [b"P", b"andas"]), (" Pandas", [b" Pand", b"as"])],
)
def test_tokenize_vectors(tok, text, tokens):
    assert tok.tokenize(text) == tokens
    assert tok.convert_tokens_to_string(tokens) == text


def test_special_token_injection_vectors(tok):
    text = 'print("<|endoftext|>")'
    assert tok.encode(text) == [1350, 445, 151643, 899]
    assert tok.encode(text, allowed_special="all") == [1350, 445, 151643, 899]
    assert tok.encode(text, allowed_special=set()) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert tok.tokenize(text) == [b"print", b'("', "<|endoftext|>", b'")']
    only_eot = tok.encode('print("<|extra_0|>")<|endoftext|>', allowed_special={"<|endoftext|>"})
    assert only_eot == [1350, 9639, 91, 15460, 62, 15, 91, 82598, 151643]
    assert tok.encode('print("<|extra_0|>")<|endoftext|>', allowed_special=["<|endoftext|>"]) == only_eot


def test_decode_vectors(tok):
    assert tok.decode([51461]) == " \ufffd"
    assert tok.decode([51461], errors="ignore") == " "
    assert tok.decode([51461, 117]) == " 根"
    assert tok.convert_ids_to_tokens(51461) == b" \xe6\xa0"
    assert QWenTokenizer(errors="ignore").decode([51461]) == " "


# ---------------------------------------------------------------------------------------------------------
# Independent pure-Python BPE

TRICKY = [
    "I'm sure you'RE right, it's WE'LL, they've, he'd, don't, 'S 'sS",
    "2023年10月9日 3.14159 1,000,000 ¹²³ ½ ٣ 一二三 ⅷ",
    "你好，世界！我是一只猫。通义千问",
    "日本語 한국어 Русский Ελληνικά العربية हिन्दी",
    "👍🏽 👨‍👩‍👧 🇨🇳 😀😃 ✨✨✨",
    "a  b   c\t\td \n\n  \r\n x \r\r\n\n y   ",
    "   leading and trailing   ",
    "\t\ttabs\t \t",
    "e\u0301 a\u0308 q\u0307 \u1100\u1161\u11a8 Å Å",
    "\u3000全角\u3000 no\u00a0break thin\u2009space \u2028 \x1c\x1d",
    "!!!??? ... --- === <<<>>> ((( ))) \"quotes\" 'single'",
    "def f(x):\n    return x**2  # ok\r\n",
    "MiXeD CaSe WoRdS and_under_scores camelCaseWords",
    "",
    "x",
    "\n",
    "<|endoftext|> text without specials allowed",
]


@pytest.mark.parametrize("text", TRICKY)
def test_matches_python_bpe(tok, text):
    expected = python_encode(text)
    assert tok.encode(text, allowed_special=set()) == expected
    assert ref_encode(text, allowed_special=set()) == expected


def test_python_bpe_on_real_text(tok):
    for line in PARAGRAPH.splitlines(keepends=True):
        assert tok.encode(line, allowed_special=set()) == python_encode(line)


# ---------------------------------------------------------------------------------------------------------
# Properties against tiktoken built directly from the file

_CHARS = st.one_of(
    st.characters(codec="utf-8"),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2009\u3000\u0301\u200d'sStTdDlLmMrReEvV019<|>_!.,")),
)
_SPECIAL_BITS = st.sampled_from(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>",
                                 "<|extra_205|>", "<|endoftext", "|>", "<|"])
_TEXT = st.lists(st.one_of(st.text(_CHARS, max_size=16), _SPECIAL_BITS), max_size=3).map("".join)
N_BATCH = 25


@settings(PROPERTY_SETTINGS, max_examples=420)
@given(st.lists(_TEXT, min_size=N_BATCH, max_size=N_BATCH))
def test_ids_match_tiktoken_reference(texts):
    # 420 examples x 25 strings = 10,500 random strings.
    tok = shared_tokenizer()
    for text in texts:
        assert tok.encode(text) == ref_encode(text)
        assert tok.encode(text, allowed_special=set()) == ref_encode(text, allowed_special=set())


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(st.lists(_TEXT, min_size=N_BATCH, max_size=N_BATCH))
def test_round_trip(texts):
    tok = shared_tokenizer()
    for text in texts:
        assert tok.decode(tok.encode(text, allowed_special=set())) == unicodedata.normalize("NFC", text)
        assert tok.convert_tokens_to_string(tok.tokenize(text)) == unicodedata.normalize("NFC", text)


def test_real_text_slices_match_reference(tok):
    rng = random.Random(0)
    n = len(PARAGRAPH)
    for _ in range(3000):
        a = rng.randrange(n)
        b = min(n, a + rng.choice([1, 2, 5, 20, 80, 400]))
        text = PARAGRAPH[a:b]
        assert tok.encode(text) == ref_encode(text)
        assert tok.decode(tok.encode(text, allowed_special=set())) == unicodedata.normalize("NFC", text)


def test_nfc_normalization(tok):
    decomposed = "cafe\u0301"
    assert tok.encode(decomposed) == tok.encode("café")
    assert tok.decode(tok.encode(decomposed)) == "café"


# ---------------------------------------------------------------------------------------------------------
# Long inputs


def _encode_pieces(pieces: list[str]) -> list[int]:
    return [i for p in pieces for i in reference_encoding().encode(p, allowed_special="all")]


@settings(PROPERTY_SETTINGS, max_examples=300)
@given(st.lists(st.one_of(st.text(_CHARS, max_size=12), _SPECIAL_BITS), max_size=6).map("".join))
def test_every_safe_cut_preserves_ids(text):
    full = reference_encoding().encode(text, allowed_special="all")
    for i in range(1, len(text)):
        if qt._is_safe_cut(text, i) and not qt._inside_special(text, i):
            assert _encode_pieces([text[:i], text[i:]]) == full, (text, i)


@settings(PROPERTY_SETTINGS, max_examples=300)
@given(st.lists(st.one_of(st.text(_CHARS, max_size=12), _SPECIAL_BITS), max_size=8).map("".join),
       st.integers(min_value=1, max_value=12))
def test_split_for_tiktoken_small_chunks(text, max_chars):
    chunks = qt._split_for_tiktoken(text, max_chars)
    assert "".join(chunks) == text and (all(chunks) or chunks == [""])
    long_ws_run = regex.search(r"\s{%d}" % (max_chars + 1), text.replace("\x1c", "x").replace("\x1d", "x"))
    if long_ws_run is None:  # only runs longer than max_chars are cut hard
        assert _encode_pieces(chunks) == reference_encoding().encode(text, allowed_special="all")


def test_safe_cuts_are_common_in_real_text():
    text = PARAGRAPH * 3
    cuts = [i for i in range(1, len(text)) if qt._is_safe_cut(text, i) and not qt._inside_special(text, i)]
    assert len(cuts) > len(text) // 4
    full = reference_encoding().encode(text, allowed_special="all")
    for i in cuts[::7]:
        assert _encode_pieces([text[:i], text[i:]]) == full
    assert not qt._is_safe_cut("a<|endoftext|>", 5) or qt._inside_special("a<|endoftext|>", 5)
    assert qt._inside_special("a<|endoftext|>", 5) and not qt._inside_special("a<|endoftext|>", 1)


def test_long_text_is_chunked_without_changing_ids(tok):
    text = PARAGRAPH * (300_000 // len(PARAGRAPH) + 1)
    chunks = qt._split_for_tiktoken(unicodedata.normalize("NFC", text))
    assert len(chunks) >= 3 and all(len(c) <= qt.MAX_CHUNK_CHARS + 100 for c in chunks)
    assert tok.encode(text) == ref_encode(text)
    assert tok.encode(text, allowed_special=set()) == ref_encode(text, allowed_special=set())


def test_two_million_char_single_line(tok):
    line = PARAGRAPH.replace("\n", " ").replace("\r", " ")
    text = (line * (2_000_000 // len(line) + 1))[:2_000_000]
    assert "\n" not in text and len(text) == 2_000_000
    assert tok.encode(text) == ref_encode(text)


def test_two_million_spaces(tok):
    text = " " * 2_000_000
    with pytest.raises(ValueError):  # why chunking exists: tiktoken 0.14 gives up on such a run
        reference_encoding().encode(text)
    chunks = qt._split_for_tiktoken(text)
    assert [len(c) for c in chunks] == [qt.MAX_CHUNK_CHARS] * 20
    ids = tok.encode(text)
    assert ids == reference_encoding().encode(" " * qt.MAX_CHUNK_CHARS) * 20
    assert tok.decode(ids) == text
    # Text around the long run is still encoded exactly.
    framed = "Hello, world. " + text + "Goodbye 你好"
    ids = tok.encode(framed)
    assert ids[:4] == tok.encode("Hello, world.") and ids[-4:] == tok.encode(" Goodbye 你好")
    assert tok.decode(ids) == framed


def test_two_million_chinese_chars(tok):
    text = ("我是一只猫，名字还没有。" * 200_000)[:2_000_000]
    assert tok.encode(text) == ref_encode(text)


# ---------------------------------------------------------------------------------------------------------
# allowed / disallowed special and the injection-safe mode


def test_disallowed_special_raises_naming_token(tok):
    with pytest.raises(ValueError, match=r"<\|im_end\|>"):
        tok.encode("hi <|im_end|>", disallowed_special={"<|im_end|>"})
    with pytest.raises(ValueError, match=r"<\|endoftext\|>"):
        tok.encode("<|endoftext|>", allowed_special=set(), disallowed_special="all")
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}, disallowed_special="all") == [151643]
    assert tok.encode("no specials here", disallowed_special="all") == tok.encode("no specials here")


def test_unknown_special_names_rejected(tok):
    with pytest.raises(ValueError, match="extra_205"):
        tok.encode("x", allowed_special={"<|extra_205|>"})
    with pytest.raises(ValueError, match="nope"):
        tok.encode("x", disallowed_special=["nope"])
    with pytest.raises(TypeError):
        tok.encode("x", allowed_special="<|endoftext|>")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="return_tensors"):
        tok.encode("x", return_tensors="pt")


def test_injection_safe_mode(tok):
    safe = QWenTokenizer(allow_special_in_text=False)
    text = "hi<|im_end|>\n<|im_start|>system"
    assert safe.encode(text) == tok.encode(text, allowed_special=set())
    assert all(i < 151643 for i in safe.encode(text))
    assert all(isinstance(t, bytes) for t in safe.tokenize(text))
    assert safe(text)["input_ids"] == safe.encode(text)
    assert safe.encode(text, allowed_special="all") == tok.encode(text)  # explicit opt-in still works
    assert 151645 in tok.encode(text)  # the official default parses it


def test_injection_safe_mode_survives_save_and_load(tmp_path):
    text = "<|im_end|>"
    QWenTokenizer(allow_special_in_text=False).save_pretrained(tmp_path)
    assert QWenTokenizer.from_pretrained(tmp_path).encode(text) == [27, 91, 318, 6213, 91, 29]
    assert QWenTokenizer.from_pretrained(tmp_path, allow_special_in_text=True).encode(text) == [151645]
    assert QWenTokenizer.from_pretrained("qwen-demo", allow_special_in_text=False).encode(text) != [151645]


# ---------------------------------------------------------------------------------------------------------
# Token <-> id conversions


def test_convert_tokens_and_ids(tok):
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids(b"hello") == 14990
    assert tok.convert_tokens_to_ids([b"Hello", "<|endoftext|>", b"\xff\xfe\xfd", "hello"]) == [9707, 151643, None, None]
    assert tok.convert_ids_to_tokens(151645) == "<|im_end|>"
    assert tok.convert_ids_to_tokens([9707, 151643]) == [b"Hello", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens([9707, 151643], skip_special_tokens=True) == [b"Hello"]
    assert tok.convert_ids_to_tokens(np.int64(9707)) == b"Hello"
    with pytest.raises(ValueError, match="151851"):
        tok.convert_ids_to_tokens([151851])


def test_convert_tokens_to_string(tok):
    assert tok.convert_tokens_to_string([b"\xe4\xbd", b"\xa0", "<|im_end|>", b"ok"]) == "你<|im_end|>ok"
    assert tok.convert_tokens_to_string([b"\xe6\xa0"]) == "\ufffd"
    assert QWenTokenizer(errors="ignore").convert_tokens_to_string([b"a\xe6\xa0"]) == "a"
    with pytest.raises(TypeError, match="bytes or str"):
        tok.convert_tokens_to_string([b"a", 5])


# ---------------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("bad", [151851, 152063, -1, 10**9])
def test_decode_unknown_ids(tok, bad):
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode([9707, bad])
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode([bad], skip_special_tokens=True)


def test_decode_inputs_and_skip_special(tok):
    ids = [151644, 872, 198, 108386, 151645, 151643, 151850]
    assert tok.decode(ids) == "<|im_start|>user\n你好<|im_end|><|endoftext|><|extra_204|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.decode(np.array(ids, dtype=np.int32)) == tok.decode(ids)
    assert tok.decode(tuple(ids)) == tok.decode(ids)
    assert tok.decode(108386) == tok.decode(torch.tensor(108386)) == tok.decode(np.int64(108386)) == "你好"
    assert tok.decode([]) == ""
    with pytest.raises(TypeError, match="batch_decode"):
        tok.decode([[1, 2]])
    with pytest.raises(TypeError):
        tok.decode([1.5])
    assert tok.batch_decode([[9707], [108386, 151643]], skip_special_tokens=True) == ["Hello", "你好"]
    assert tok.batch_decode(torch.tensor([[9707, 1879], [108386, 151643]])) == ["Hello world", "你好<|endoftext|>"]
    assert tok.decode([9707], clean_up_tokenization_spaces=False) == "Hello"


# ---------------------------------------------------------------------------------------------------------
# __call__: padding, truncation, tensors


def test_call_single_and_batch(tok):
    out = tok("Hello world")
    assert isinstance(out, BatchEncoding)
    assert out == {"input_ids": [9707, 1879], "token_type_ids": [0, 0], "attention_mask": [1, 1]}
    assert out.input_ids == [9707, 1879] and out.attention_mask == [1, 1]
    with pytest.raises(AttributeError):
        out.nope
    batch = tok(["Hello world", "你好"])
    assert batch.input_ids == [[9707, 1879], [108386]] and batch.attention_mask == [[1, 1], [1]]
    assert "attention_mask" not in tok("x", return_attention_mask=False)
    pt = tok("Hello world", return_tensors="pt")
    assert pt.input_ids.shape == (1, 2) and pt.input_ids.dtype == torch.long
    assert pickle.loads(pickle.dumps(batch)) == batch


def test_padding_requires_pad_token(tok):
    with pytest.raises(ValueError, match=r"pad_token='<\|extra_0\|>'"):
        tok(["a", "bb cc"], padding=True)
    with pytest.raises(ValueError, match="padding=True"):
        tok(["Hello world", "你好"], return_tensors="pt")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_sides(padded, side):
    texts = ["Hello world", "你好", "Hello world!\n\n"]
    out = padded(texts, padding=True, padding_side=side, return_tensors="pt")
    assert out.input_ids.shape == out.attention_mask.shape == out.token_type_ids.shape == (3, 3)
    pad = padded.pad_token_id
    assert pad == 151646
    rows = [[9707, 1879], [108386], [9707, 1879, 2219]]
    for row, ids, mask in zip(rows, out.input_ids.tolist(), out.attention_mask.tolist()):
        n = 3 - len(row)
        if side == "left":
            assert ids == [pad] * n + row and mask == [0] * n + [1] * len(row)
        else:
            assert ids == row + [pad] * n and mask == [1] * len(row) + [0] * n
    assert out.token_type_ids.sum() == 0
    moved = out.to("cpu")
    assert moved is out and moved.input_ids.device.type == "cpu"
    left_default = QWenTokenizer(pad_token="<|extra_0|>", padding_side="left")
    assert left_default(texts, padding=True).input_ids[1] == [pad, pad, 108386]


def test_padding_max_length_truncation_and_numpy(padded):
    out = padded(["Hello world", "你好"], padding="max_length", max_length=4, return_tensors="np")
    assert isinstance(out.input_ids, np.ndarray) and out.input_ids.dtype == np.int64
    assert out.input_ids.tolist() == [[9707, 1879, 151646, 151646], [108386, 151646, 151646, 151646]]
    assert out.attention_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    ids = [16, 17, 18, 19, 20]
    assert padded("12345", truncation=True, max_length=3).input_ids == [16, 17, 18]
    assert padded("12345", truncation=True, max_length=3, truncation_side="left").input_ids == [18, 19, 20]
    assert padded("12345", max_length=3).input_ids == ids  # no truncation unless asked
    assert padded(["1", "12345"], padding=True, pad_to_multiple_of=4).input_ids == [[16] + [151646] * 7, ids + [151646] * 3]
    capped = QWenTokenizer(model_max_length=2, pad_token="<|endoftext|>")
    assert capped("12345", truncation=True).input_ids == [16, 17]
    assert capped(["1"], padding="max_length").input_ids == [[16, 151643]]
    with pytest.raises(ValueError, match="max_length"):
        padded(["x"], padding="max_length")
    with pytest.raises(ValueError, match="padding_side"):
        padded(["x"], padding=True, padding_side="middle")
    with pytest.raises(TypeError, match="text_pair"):
        padded("x", text_pair="y")


def test_pad_and_eos_tokens():
    t = QWenTokenizer(pad_token="<|extra_0|>", eos_token="<|endoftext|>")
    assert (t.pad_token, t.pad_token_id, t.eos_token, t.eos_token_id) == ("<|extra_0|>", 151646, "<|endoftext|>", 151643)
    with pytest.raises(ValueError, match="<pad>"):
        QWenTokenizer(pad_token="<pad>")
    with pytest.raises(ValueError, match="hello"):
        QWenTokenizer(eos_token="hello")
    t.pad_token_id = t.eod_id  # what the official finetune.py does
    assert t.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="151851"):
        t.pad_token_id = 151851
    assert t.add_special_tokens({"pad_token": "<|extra_1|>"}) == 0 and t.pad_token_id == 151647
    with pytest.raises(ValueError):
        t.add_tokens(["brand-new"])
    assert QWenTokenizer(pad_token={"content": "<|extra_2|>"}).pad_token_id == 151648


def test_hf_kwargs_ignored():
    t = QWenTokenizer(trust_remote_code=True, revision="main", use_fast=False)
    assert t.encode("你好") == [108386]
    with pytest.raises(LookupError):
        QWenTokenizer(errors="no-such-handler")
    with pytest.raises(ValueError, match="padding_side"):
        QWenTokenizer(padding_side="up")


# ---------------------------------------------------------------------------------------------------------
# Persistence


def test_pickle_round_trip(tmp_path):
    t = QWenTokenizer(pad_token="<|extra_0|>", padding_side="left")
    blob = pickle.dumps(t)
    assert len(blob) < 100_000  # the bundled vocabulary is reloaded, not pickled
    u = pickle.loads(blob)
    text = PARAGRAPH[:500]
    assert u.encode(text) == t.encode(text) and u.decode(u.encode(text)) == t.decode(t.encode(text))
    assert (u.pad_token_id, u.padding_side, len(u)) == (151646, "left", 151851)
    extra = _write_extra_vocab(tmp_path)
    e = QWenTokenizer(extra_vocab_file=extra)
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.encode("我是一只猫") == e.encode("我是一只猫") == [151854]


def test_save_and_from_pretrained_round_trip(tmp_path):
    t = QWenTokenizer(pad_token="<|extra_0|>", eos_token="<|endoftext|>", padding_side="left", model_max_length=8192)
    files = t.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["qwen.tiktoken", "tokenizer_config.json"]
    vocab = tmp_path / "ckpt" / "qwen.tiktoken"
    assert vocab.read_bytes() == qt.bundled_vocab_path().read_bytes()  # byte-identical to the release
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "QWenTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
    assert (config["model_max_length"], config["padding_side"], config["pad_token"]) == (8192, "left", "<|extra_0|>")
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    u = QWenTokenizer.from_pretrained(tmp_path / "ckpt")
    assert u.vocab_file == str(vocab)
    assert u.tokenizer is shared_tokenizer().tokenizer  # the released file is recognised and shared
    assert (u.pad_token_id, u.eos_token_id, u.padding_side, u.model_max_length) == (151646, 151643, "left", 8192)
    assert u.encode(PARAGRAPH) == t.encode(PARAGRAPH)
    assert QWenTokenizer.from_pretrained(tmp_path / "ckpt", padding_side="right").padding_side == "right"
    assert t.save_vocabulary(tmp_path, filename_prefix="x") == (str(tmp_path / "x-qwen.tiktoken"),)


def test_from_pretrained_sources(tmp_path):
    assert QWenTokenizer.from_pretrained("qwen-demo").encode("你好") == [108386]
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen-7B-Chat-does-not-exist"):
        QWenTokenizer.from_pretrained("Qwen/Qwen-7B-Chat-does-not-exist")
    # A directory without a vocabulary falls back to the bundled one but still reads its config.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer", "pad_token": None, "padding_side": "left"}))
    t = QWenTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert t.vocab_file is None and t.model_max_length == 8192 and t.padding_side == "left" and t.pad_token is None
    # The checkpoint's own vocabulary wins over the bundled one.
    (tmp_path / "qwen.tiktoken").write_bytes(
        qt.bundled_vocab_path().read_bytes() + base64.b64encode("我是一只猫".encode()) + b" 151851\n")
    t = QWenTokenizer.from_pretrained(tmp_path)
    assert t.encode("我是一只猫") == [151851] and len(t) == 151852
    assert QWenTokenizer.from_pretrained(tmp_path / "qwen.tiktoken").encode("我是一只猫") == [151851]


def _write_extra_vocab(tmp_path) -> str:
    # The Qwen repo's examples/add_merges.py output for "我是一只猫"-style additions, ids from 151851.
    entries = ["一只猫", "只猫", "是一只猫", "我是一只猫", "你是一只猫", "他是一只猫"]
    lines = [f"{base64.b64encode(w.encode()).decode()} {151851 + i}" for i, w in enumerate(entries)]
    lines.append(f"{base64.b64encode(b'hello').decode()} 151900")  # known bytes: skipped
    lines.append(f"{base64.b64encode('新词'.encode()).decode()} 151645")  # id of <|im_end|>: skipped
    lines.append(f"{base64.b64encode('稀疏'.encode()).decode()} 151870")  # sparse id: kept
    path = tmp_path / "extra.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_extra_vocab_file(tmp_path, tok):
    t = QWenTokenizer(extra_vocab_file=_write_extra_vocab(tmp_path))
    assert t.encode("我是一只猫") == [151854]
    assert t.encode("他是一只猫，你是一只猫") == [151856, 3837, 151855]
    assert t.decode([151854, 151870]) == "我是一只猫稀疏"
    assert t.encode("hello") == [14990] and t.encode("新词") == tok.encode("新词")
    assert len(t) == t.vocab_size == 151871  # largest id + 1
    assert len(t.get_vocab()) == 151643 + 7
    with pytest.raises(ValueError, match="151860"):  # a hole left by the sparse ids
        t.decode([151860])
    assert len(tok.get_vocab()) == 151643  # the shared bundled vocabulary is untouched
    saved = QWenTokenizer.from_pretrained(t.save_pretrained(tmp_path / "out")[0].rsplit("/", 1)[0])
    assert saved.encode("我是一只猫稀疏") == t.encode("我是一只猫稀疏") and len(saved) == 151871


# ---------------------------------------------------------------------------------------------------------
# Vocabulary file errors


def test_corrupted_vocab_file_names_file_and_line(tmp_path):
    path = tmp_path / "broken.tiktoken"
    path.write_text("IQ== 0\nIg== 1\nthis-is-not-base64!! 2\n")
    with pytest.raises(VocabFileError, match=r"broken\.tiktoken, line 3"):
        QWenTokenizer(vocab_file=path)
    path.write_text("IQ== 0\nIg==\n")
    with pytest.raises(ValueError, match=r"broken\.tiktoken, line 2"):
        qt.load_tiktoken_bpe(path)
    path.write_text("IQ== 0\nIg== 0\n")
    with pytest.raises(ValueError, match=r"line 2: rank 0 is used twice"):
        qt.load_tiktoken_bpe(path)
    with pytest.raises(FileNotFoundError):
        QWenTokenizer(vocab_file=tmp_path / "missing.tiktoken")


def test_bundled_checksum_is_verified(monkeypatch):
    monkeypatch.setattr(qt, "BUNDLED_VOCAB_SHA256", "0" * 64)
    with pytest.raises(VocabFileError, match="corrupted"):
        qt._bundled_ranks.__wrapped__()
